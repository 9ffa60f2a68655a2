"""The trace store in Redis (standalone or Cluster), shared by a fleet of sidecars: the store, its
span records, its pipelined round trips, and its Lua scripts (`scripts/*.lua`)."""

from sidecar.stores.redis.connection import connect
from sidecar.stores.redis.store import RedisStore

__all__ = ["RedisStore", "connect"]
