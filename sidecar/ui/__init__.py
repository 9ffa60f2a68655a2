"""`betrace ui`: the signal explorer and rule playground, a small web page over the signal
database (read-only) and the loaded rules. Imports `model`, `signaldb` and `rules`."""
