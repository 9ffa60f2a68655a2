/* Replay's held and spilled traces packed into bytes and unpacked straight into `Span`s, in C:
 * what marshal did with a tuple per span, at about half the cost (tuples made, marshalled, loaded
 * and made into spans again: 3.1 us per span, against 1.7-1.9). A `Packer` takes the decoders'
 * batches as they come and keeps them packed, already in their partitions (a held span costs its
 * packed bytes, not a Python object); `unpack` merges a partition's chunks by trace id. The
 * strings spans share (names, statuses, kinds, services, versions, attribute keys, --group-by
 * values) are written once per chunk; the values a rule reads are written as they are (None,
 * bool, int, float, str) and anything else through marshal. See sidecar/replay/partitions.py,
 * the one caller. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <marshal.h>
#include <stdint.h>
#include <string.h>

#define SLOTS 12  /* Span's slots, in the order of sidecar.model.spans.SLOT_DESCRIPTORS */
#define TRACE_ID 0
#define ATTRIBUTES 10
/* Which slots hold a string many spans share (name, status, kind, service, version, group). */
static const int SHARED[SLOTS] = {0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 0, 1};

/* Each value starts with its tag. A shared str is written (FIRST) the first time, then referred
 * to (SEEN) by the order of its first time. */
enum { NONE = 'N', TRUE = 'T', FALSE = 'F', INT = 'i', FLOAT = 'd', TEXT = 's', FIRST = 'S',
       SEEN = 'r', MARSHAL = 'm', EMPTY = 'e', DICT = 'a' };

#define RECENT 16  /* shared strs remembered by address: most recur span after span */

typedef struct {
    char *data;
    Py_ssize_t size, capacity;
    PyObject *seen;  /* dict: a shared str -> its index, in the order first written */
    PyObject *recent[RECENT];  /* (strong references: an address is never another str's) */
    Py_ssize_t recent_index[RECENT];
} writer;

static void forget(writer *w) {
    PyMem_Free(w->data);
    Py_CLEAR(w->seen);
    for (int i = 0; i < RECENT; i++)
        Py_CLEAR(w->recent[i]);
    w->data = NULL;
    w->size = w->capacity = 0;
}

static int room(writer *w, Py_ssize_t more) {
    if (w->size + more <= w->capacity)
        return 0;
    Py_ssize_t capacity = w->capacity * 2 > w->size + more ? w->capacity * 2 : w->size + more;
    char *grown = PyMem_Realloc(w->data, (size_t)capacity);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    w->data = grown;
    w->capacity = capacity;
    return 0;
}

static int put(writer *w, const void *bytes, Py_ssize_t size) {
    if (room(w, size) < 0)
        return -1;
    memcpy(w->data + w->size, bytes, (size_t)size);
    w->size += size;
    return 0;
}

static int put_tag(writer *w, char tag) {
    return put(w, &tag, 1);
}

/* `value` as a varint in `bytes`; its length. */
static int varint(unsigned char bytes[10], uint64_t value) {
    int n = 0;
    do {
        bytes[n++] = (unsigned char)((value & 0x7F) | (value > 0x7F ? 0x80 : 0));
        value >>= 7;
    } while (value);
    return n;
}

static int put_size(writer *w, uint64_t value) {
    unsigned char bytes[10];
    return put(w, bytes, varint(bytes, value));
}

/* A shared str already written: referred to by its index, which is remembered by address. */
static int put_seen(writer *w, size_t at, PyObject *value, Py_ssize_t index) {
    Py_XSETREF(w->recent[at], Py_NewRef(value));
    w->recent_index[at] = index;
    unsigned char bytes[11] = {SEEN};
    return put(w, bytes, 1 + varint(bytes + 1, (uint64_t)index));
}

/* One value; a str that `shared` says recurs is written once and referred to after. */
static int put_value(writer *w, PyObject *value, int shared) {
    if (value == Py_None)
        return put_tag(w, NONE);
    if (value == Py_True || value == Py_False)
        return put_tag(w, value == Py_True ? TRUE : FALSE);
    if (PyUnicode_CheckExact(value)) {
        if (shared) {
            size_t at = ((uintptr_t)value >> 4) % RECENT;
            if (w->recent[at] == value)
                return put_seen(w, at, value, w->recent_index[at]);
            PyObject *index = PyDict_GetItemWithError(w->seen, value);
            if (index != NULL)
                return put_seen(w, at, value, PyLong_AsSsize_t(index));
            if (PyErr_Occurred())
                return -1;
        }
        Py_ssize_t size;
        const char *text = PyUnicode_AsUTF8AndSize(value, &size);
        if (text == NULL) {  /* a lone surrogate: marshal keeps it */
            PyErr_Clear();
        } else {
            if (shared) {
                PyObject *index = PyLong_FromSsize_t(PyDict_GET_SIZE(w->seen));
                int failed = index == NULL || PyDict_SetItem(w->seen, value, index) < 0;
                Py_XDECREF(index);
                if (failed)
                    return -1;
            }
            return put_tag(w, shared ? FIRST : TEXT) < 0 || put_size(w, (uint64_t)size) < 0
                       ? -1 : put(w, text, size);
        }
    } else if (PyLong_CheckExact(value)) {
        int overflow;
        long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (number == -1 && PyErr_Occurred())
            return -1;
        if (!overflow)
            return put_tag(w, INT) < 0 ? -1 : put(w, &number, 8);
    } else if (PyFloat_CheckExact(value)) {
        double number = PyFloat_AS_DOUBLE(value);
        return put_tag(w, FLOAT) < 0 ? -1 : put(w, &number, 8);
    }
    PyObject *marshalled = PyMarshal_WriteObjectToString(value, Py_MARSHAL_VERSION);
    if (marshalled == NULL)
        return -1;
    int failed = put_tag(w, MARSHAL) < 0 ||
                 put_size(w, (uint64_t)PyBytes_GET_SIZE(marshalled)) < 0 ||
                 put(w, PyBytes_AS_STRING(marshalled), PyBytes_GET_SIZE(marshalled)) < 0;
    Py_DECREF(marshalled);
    return failed ? -1 : 0;
}

static int put_attributes(writer *w, PyObject *attributes) {
    if (!PyDict_CheckExact(attributes))
        return put_value(w, attributes, 0);
    if (PyDict_GET_SIZE(attributes) == 0)
        return put_tag(w, EMPTY);
    if (put_tag(w, DICT) < 0 || put_size(w, (uint64_t)PyDict_GET_SIZE(attributes)) < 0)
        return -1;
    Py_ssize_t at = 0;
    PyObject *key, *value;
    while (PyDict_Next(attributes, &at, &key, &value))
        if (put_value(w, key, 1) < 0 || put_value(w, value, 0) < 0)
            return -1;
    return 0;
}

/* Every slot of a span but the trace id (the trace's). */
static int put_span(writer *w, PyObject *span, PyObject *slots) {
    for (int i = 0; i < SLOTS; i++) {
        if (i == TRACE_ID)
            continue;
        PyObject *slot = PyTuple_GET_ITEM(slots, i);
        descrgetfunc get = Py_TYPE(slot)->tp_descr_get;
        PyObject *value = get == NULL ? NULL : get(slot, span, (PyObject *)Py_TYPE(span));
        if (value == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "Packer: slots must be descriptors");
            return -1;
        }
        int failed = i == ATTRIBUTES ? put_attributes(w, value) : put_value(w, value, SHARED[i]);
        Py_DECREF(value);
        if (failed < 0)
            return -1;
    }
    return 0;
}

static int hex_value(int c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* A trace's part among `count` at split depth `depth`: eight hex digits of its id, other ones at
 * each depth (ids from the decoders are 32 hex digits); any other id by a hash of its text. */
static Py_ssize_t part_of(PyObject *trace_id, Py_ssize_t count, int depth) {
    Py_ssize_t size;
    const char *text = PyUnicode_AsUTF8AndSize(trace_id, &size);
    if (text == NULL) {
        PyErr_Clear();  /* (a lone surrogate) */
        return 0;
    }
    uint64_t value = 0;
    if (size == 32) {
        for (int i = 24 - 8 * depth; i < 32 - 8 * depth; i++) {
            int digit = hex_value((unsigned char)text[i]);
            if (digit < 0)
                goto hashed;
            value = value << 4 | (uint64_t)digit;
        }
        return (Py_ssize_t)(value % (uint64_t)count);
    }
hashed:
    value = 14695981039346656037ULL ^ (uint64_t)depth;  /* FNV-1a */
    for (Py_ssize_t i = 0; i < size; i++)
        value = (value ^ (unsigned char)text[i]) * 1099511628211ULL;
    return (Py_ssize_t)(value % (uint64_t)count);
}

typedef struct {
    PyObject_HEAD
    Py_ssize_t count;  /* parts */
    int depth;
    PyObject *slots;
    writer *parts;
    uint64_t *traces;  /* trace entries written to each part */
    Py_ssize_t size;   /* bytes held, all parts */
    int broken;        /* an add failed halfway: what is held is not whole */
} Packer;

static void clear_part(Packer *self, Py_ssize_t i) {
    self->size -= self->parts[i].size;
    forget(&self->parts[i]);
    self->traces[i] = 0;
}

static void clear_parts(Packer *self) {
    for (Py_ssize_t i = 0; self->parts != NULL && i < self->count; i++)
        clear_part(self, i);
}

static void Packer_dealloc(Packer *self) {
    clear_parts(self);
    PyMem_Free(self->parts);
    PyMem_Free(self->traces);
    Py_XDECREF(self->slots);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Packer_init(Packer *self, PyObject *args, PyObject *kwargs) {
    Py_ssize_t count;
    int depth;
    PyObject *slots;
    static char *names[] = {"count", "depth", "slots", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "niO!:Packer", names, &count, &depth,
                                     &PyTuple_Type, &slots))
        return -1;
    if (count < 1 || depth < 0 || depth > 2 || PyTuple_GET_SIZE(slots) != SLOTS) {
        PyErr_SetString(PyExc_ValueError, "Packer: count >= 1, depth 0-2 and Span's 12 slots");
        return -1;
    }
    if (self->parts != NULL) {
        PyErr_SetString(PyExc_TypeError, "Packer: already made");
        return -1;
    }
    self->parts = PyMem_Calloc((size_t)count, sizeof(writer));
    self->traces = PyMem_Calloc((size_t)count, sizeof(uint64_t));
    if (self->parts == NULL || self->traces == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->count = count;
    self->depth = depth;
    self->slots = Py_NewRef(slots);
    return 0;
}

/* One trace's spans appended to its part. */
static int add_trace(Packer *self, PyObject *trace_id, PyObject *spans) {
    if (!PyUnicode_CheckExact(trace_id) || !PyList_CheckExact(spans)) {
        PyErr_SetString(PyExc_TypeError, "Packer.add: each trace is (trace_id: str, [Span, ...])");
        return -1;
    }
    Py_ssize_t number = part_of(trace_id, self->count, self->depth);
    writer *w = &self->parts[number];
    if (w->seen == NULL && (w->seen = PyDict_New()) == NULL)
        return -1;
    Py_ssize_t before = w->size;
    self->broken = 1;  /* until this trace is written whole */
    if (put_value(w, trace_id, 0) < 0 || put_size(w, (uint64_t)PyList_GET_SIZE(spans)) < 0)
        return -1;
    for (Py_ssize_t s = 0; s < PyList_GET_SIZE(spans); s++)
        if (put_span(w, PyList_GET_ITEM(spans, s), self->slots) < 0)
            return -1;
    self->broken = 0;
    self->traces[number]++;
    self->size += w->size - before;
    return 0;
}

/* 1 with a RuntimeError when an add failed halfway: what the packer holds is not whole. */
static int broken(Packer *self) {
    if (self->broken)
        PyErr_SetString(PyExc_RuntimeError, "Packer: an earlier add failed halfway");
    return self->broken;
}

PyDoc_STRVAR(add_doc,
"add(traces: dict[str, list[Span]] | list[tuple[str, list[Span]]]) -> int\n\n"
"Append each trace's spans to its part; the spans added.");

static PyObject *Packer_add(Packer *self, PyObject *traces) {
    if (broken(self))
        return NULL;
    Py_ssize_t spans = 0;
    if (PyDict_CheckExact(traces)) {
        Py_ssize_t at = 0;
        PyObject *trace_id, *found;
        while (PyDict_Next(traces, &at, &trace_id, &found)) {
            if (add_trace(self, trace_id, found) < 0)
                return NULL;
            spans += PyList_GET_SIZE(found);
        }
    } else if (PyList_CheckExact(traces)) {
        for (Py_ssize_t t = 0; t < PyList_GET_SIZE(traces); t++) {
            PyObject *item = PyList_GET_ITEM(traces, t);
            if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2) {
                PyErr_SetString(PyExc_TypeError,
                                "Packer.add: each trace is (trace_id: str, [Span, ...])");
                return NULL;
            }
            if (add_trace(self, PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1)) < 0)
                return NULL;
            spans += PyList_GET_SIZE(PyTuple_GET_ITEM(item, 1));
        }
    } else {
        PyErr_SetString(PyExc_TypeError, "Packer.add: a dict or a list of traces");
        return NULL;
    }
    return PyLong_FromSsize_t(spans);
}

PyDoc_STRVAR(take_doc,
"take() -> list[bytes | None]\n\n"
"Each part's chunk for `unpack` (None where nothing was added), by part number; each part is let\n"
"go as its chunk is made (what is held is not copied whole), and the packer is empty after.");

static PyObject *Packer_take(Packer *self, PyObject *unused) {
    if (broken(self))
        return NULL;
    PyObject *chunks = PyList_New(self->count);
    if (chunks == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->count; i++) {
        writer *w = &self->parts[i];
        if (w->size == 0) {
            PyList_SET_ITEM(chunks, i, Py_NewRef(Py_None));
            continue;
        }
        unsigned char head[10];
        int n = varint(head, self->traces[i]);  /* the chunk starts with its trace count */
        PyObject *chunk = PyBytes_FromStringAndSize(NULL, n + w->size);
        if (chunk == NULL) {
            self->broken = 1;  /* (parts before this one are gone) */
            Py_DECREF(chunks);
            return NULL;
        }
        memcpy(PyBytes_AS_STRING(chunk), head, (size_t)n);
        memcpy(PyBytes_AS_STRING(chunk) + n, w->data, (size_t)w->size);
        PyList_SET_ITEM(chunks, i, chunk);
        clear_part(self, i);
    }
    return chunks;
}

static PyObject *Packer_size(Packer *self, void *unused) {
    return PyLong_FromSsize_t(self->size);
}

static PyMethodDef packer_methods[] = {
    {"add", (PyCFunction)Packer_add, METH_O, add_doc},
    {"take", (PyCFunction)Packer_take, METH_NOARGS, take_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef packer_getset[] = {
    {"size", (getter)Packer_size, NULL, "bytes held, all parts", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PackerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidecar.replay._spill.Packer",
    .tp_doc = PyDoc_STR(
        "Packer(count, depth, slots): traces' spans packed into bytes, in `count` parts by trace\n"
        "id (part_of: eight hex digits of the id, other ones at each split depth); every slot\n"
        "but the trace id, read through `slots` (Span's member descriptors, in partitions.py's\n"
        "order); the strings spans share written once per part."),
    .tp_basicsize = sizeof(Packer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Packer_init,
    .tp_dealloc = (destructor)Packer_dealloc,
    .tp_methods = packer_methods,
    .tp_getset = packer_getset,
};

typedef struct {
    const unsigned char *p, *end;
    PyObject *seen;  /* list: the shared strs, by index */
} reader;

static int corrupt(void) {
    PyErr_SetString(PyExc_ValueError, "unpack: not what pack wrote");
    return -1;
}

static int get_size(reader *r, uint64_t *value) {
    uint64_t result = 0;
    for (int shift = 0; shift < 64 && r->p < r->end; shift += 7) {
        unsigned char byte = *r->p++;
        result |= (uint64_t)(byte & 0x7F) << shift;
        if (byte < 0x80) {
            *value = result;
            return 0;
        }
    }
    return corrupt();
}

static int get_bytes(reader *r, Py_ssize_t size, const unsigned char **at) {
    if (size < 0 || size > r->end - r->p)
        return corrupt();
    *at = r->p;
    r->p += size;
    return 0;
}

static PyObject *get_value(reader *r) {
    const unsigned char *at;
    uint64_t size;
    if (r->p >= r->end) {
        corrupt();
        return NULL;
    }
    switch (*r->p++) {
    case NONE: return Py_NewRef(Py_None);
    case TRUE: return Py_NewRef(Py_True);
    case FALSE: return Py_NewRef(Py_False);
    case INT: {
        long long number;
        if (get_bytes(r, 8, &at) < 0)
            return NULL;
        memcpy(&number, at, 8);
        return PyLong_FromLongLong(number);
    }
    case FLOAT: {
        double number;
        if (get_bytes(r, 8, &at) < 0)
            return NULL;
        memcpy(&number, at, 8);
        return PyFloat_FromDouble(number);
    }
    case TEXT:
    case FIRST:
    case MARSHAL: {
        char tag = (char)r->p[-1];
        if (get_size(r, &size) < 0 || size > (uint64_t)PY_SSIZE_T_MAX ||
                get_bytes(r, (Py_ssize_t)size, &at) < 0)
            return NULL;
        if (tag == MARSHAL)
            return PyMarshal_ReadObjectFromString((const char *)at, (Py_ssize_t)size);
        PyObject *value = PyUnicode_DecodeUTF8((const char *)at, (Py_ssize_t)size, NULL);
        if (value != NULL && tag == FIRST && PyList_Append(r->seen, value) < 0)
            Py_CLEAR(value);
        return value;
    }
    case SEEN:
        if (get_size(r, &size) < 0)
            return NULL;
        if (size >= (uint64_t)PyList_GET_SIZE(r->seen)) {
            corrupt();
            return NULL;
        }
        return Py_NewRef(PyList_GET_ITEM(r->seen, (Py_ssize_t)size));
    default:
        corrupt();
        return NULL;
    }
}

static PyObject *get_attributes(reader *r, PyObject *empty) {
    if (r->p < r->end && *r->p == EMPTY) {
        r->p++;
        return Py_NewRef(empty);
    }
    if (r->p >= r->end || *r->p != DICT)
        return get_value(r);
    r->p++;
    uint64_t count;
    if (get_size(r, &count) < 0)
        return NULL;
    PyObject *attributes = PyDict_New();
    for (uint64_t i = 0; attributes != NULL && i < count; i++) {
        PyObject *key = get_value(r), *value = key == NULL ? NULL : get_value(r);
        if (value == NULL || PyDict_SetItem(attributes, key, value) < 0)
            Py_CLEAR(attributes);
        Py_XDECREF(key);
        Py_XDECREF(value);
    }
    return attributes;
}

/* --- scanning packed spans without making them ---------------------------------------------- */

/* One packed value, seen where it lies: its tag and what it holds. A shared str written here the
 * first time is made (later ones refer to it), and `text` is then its own. */
typedef struct {
    char tag;  /* NONE, TRUE, FALSE, INT, FLOAT, TEXT (FIRST and SEEN read as TEXT), MARSHAL */
    long long integer;
    double number;
    const char *text;
    Py_ssize_t size;
    PyObject *shared;  /* FIRST and SEEN: the str (borrowed from r->seen) */
} view;

static int read_view(reader *r, view *v) {
    uint64_t size;
    const unsigned char *at;
    if (r->p >= r->end)
        return corrupt();
    v->tag = (char)*r->p++;
    v->shared = NULL;
    switch (v->tag) {
    case NONE: case TRUE: case FALSE:
        return 0;
    case INT: case FLOAT:
        if (get_bytes(r, 8, &at) < 0)
            return -1;
        if (v->tag == INT)
            memcpy(&v->integer, at, 8);
        else
            memcpy(&v->number, at, 8);
        return 0;
    case TEXT: case FIRST: case MARSHAL:
        if (get_size(r, &size) < 0 || size > (uint64_t)PY_SSIZE_T_MAX ||
                get_bytes(r, (Py_ssize_t)size, &at) < 0)
            return -1;
        v->text = (const char *)at;
        v->size = (Py_ssize_t)size;
        if (v->tag != FIRST)
            return 0;
        PyObject *text = PyUnicode_DecodeUTF8(v->text, v->size, NULL);
        int failed = text == NULL || PyList_Append(r->seen, text) < 0;
        Py_XDECREF(text);
        v->tag = TEXT;
        v->shared = failed ? NULL : text;
        return failed ? -1 : 0;
    case SEEN:
        if (get_size(r, &size) < 0)
            return -1;
        if (size >= (uint64_t)PyList_GET_SIZE(r->seen))
            return corrupt();
        v->shared = PyList_GET_ITEM(r->seen, (Py_ssize_t)size);
        v->tag = TEXT;
        v->text = PyUnicode_AsUTF8AndSize(v->shared, &v->size);
        return v->text == NULL ? -1 : 0;
    default:
        return corrupt();
    }
}

/* A span's attributes as views: count < 0 when they are not a dict of str keys. */
typedef struct {
    Py_ssize_t count;
    PyObject **keys;  /* borrowed from r->seen */
    view *values;
} attribute_views;

static int read_attributes(reader *r, attribute_views *a) {
    a->count = 0;
    if (r->p < r->end && *r->p == EMPTY) {
        r->p++;
        return 0;
    }
    if (r->p >= r->end || *r->p != DICT) {
        view ignored;
        a->count = -1;
        return read_view(r, &ignored);
    }
    r->p++;
    uint64_t count;
    if (get_size(r, &count) < 0)
        return -1;
    if (count > (uint64_t)(r->end - r->p) / 2)  /* (a key and a value take two bytes or more) */
        return corrupt();
    a->keys = PyMem_Malloc((size_t)(count ? count : 1) * sizeof(PyObject *));
    a->values = PyMem_Malloc((size_t)(count ? count : 1) * sizeof(view));
    if (a->keys == NULL || a->values == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int strings = 1;
    for (uint64_t i = 0; i < count; i++) {
        view key;
        if (read_view(r, &key) < 0 || read_view(r, &a->values[i]) < 0)
            return -1;
        strings &= key.shared != NULL;
        a->keys[i] = key.shared;
    }
    a->count = strings ? (Py_ssize_t)count : -1;
    return 0;
}

static void free_attributes(attribute_views *a) {
    PyMem_Free(a->keys);
    PyMem_Free(a->values);
    a->keys = NULL;
    a->values = NULL;
}

enum { NO = 0, YES = 1, MAYBE = 2 };
/* PlainTest's kinds and PLAIN_OPS, in sidecar/dsl/compiler.py */
enum { T_UNKNOWN, T_COMPARE, T_BARE, T_NOT, T_AND, T_OR };
enum { EQ, NE, LT, LE, GT, GE };

static const view *attribute(const attribute_views *a, PyObject *key) {
    for (Py_ssize_t i = 0; i < a->count; i++) {
        PyObject *k = a->keys[i];
        if (k == key || (PyUnicode_GET_LENGTH(k) == PyUnicode_GET_LENGTH(key) &&
                         PyUnicode_Compare(k, key) == 0))
            return &a->values[i];
    }
    return NULL;
}

static int ordered(int op, int sign) {  /* sign: <0, 0, >0 as value is below, at, above */
    switch (op) {
    case EQ: return sign == 0;
    case NE: return sign != 0;
    case LT: return sign < 0;
    case LE: return sign <= 0;
    case GT: return sign > 0;
    default: return sign >= 0;
    }
}

/* `value op literal` as sidecar.dsl's _compare has it, for a value that is there. */
static int compare(const view *v, int op, PyObject *literal) {
    if (v->tag == MARSHAL)
        return MAYBE;  /* (a big int, a tuple, ...) */
    if (PyBool_Check(literal)) {  /* equal only to itself; no order */
        if (op > NE)
            return NO;
        int equal = v->tag == (literal == Py_True ? TRUE : FALSE);
        return op == EQ ? equal : !equal;
    }
    if (PyUnicode_Check(literal)) {  /* equal and ordered only with a str */
        if (v->tag != TEXT)
            return op == NE ? YES : NO;
        Py_ssize_t size;
        const char *text = PyUnicode_AsUTF8AndSize(literal, &size);
        if (text == NULL) {
            PyErr_Clear();
            return MAYBE;
        }
        int sign = memcmp(v->text, text, (size_t)(v->size < size ? v->size : size));
        sign = sign != 0 ? sign : (v->size > size) - (v->size < size);
        return ordered(op, sign);  /* (UTF-8 orders as code points do) */
    }
    if (v->tag != INT && v->tag != FLOAT)  /* a number against anything but a number */
        return op == NE ? YES : NO;
    double value, other;
    if (PyLong_Check(literal)) {
        int overflow;
        long long number = PyLong_AsLongLongAndOverflow(literal, &overflow);
        if (overflow || (number == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return MAYBE;
        }
        if (v->tag == INT)
            return ordered(op, (v->integer > number) - (v->integer < number));
        if (number > (1LL << 53) || number < -(1LL << 53))
            return MAYBE;
        value = v->number;
        other = (double)number;
    } else if (PyFloat_Check(literal)) {
        if (v->tag == INT && (v->integer > (1LL << 53) || v->integer < -(1LL << 53)))
            return MAYBE;
        value = v->tag == INT ? (double)v->integer : v->number;
        other = PyFloat_AS_DOUBLE(literal);
    } else {
        return MAYBE;
    }
    switch (op) {  /* (NaN: false but for !=) */
    case EQ: return value == other;
    case NE: return value != other;
    case LT: return value < other;
    case LE: return value <= other;
    case GT: return value > other;
    default: return value >= other;
    }
}

/* A small int, or -1. */
static long number_in(PyObject *value) {
    long number = PyLong_Check(value) ? PyLong_AsLong(value) : -1;
    if (number == -1)
        PyErr_Clear();
    return number;
}

/* A PlainTest on a span's attributes: NO, YES or MAYBE (what it cannot tell). */
static int judge(PyObject *test, const attribute_views *a) {
    if (!PyTuple_Check(test) || PyTuple_GET_SIZE(test) < 1)
        return MAYBE;
    long kind = number_in(PyTuple_GET_ITEM(test, 0));
    Py_ssize_t size = PyTuple_GET_SIZE(test);
    if (kind == T_NOT && size == 2) {
        int inner = judge(PyTuple_GET_ITEM(test, 1), a);
        return inner == MAYBE ? MAYBE : !inner;
    }
    if (kind == T_AND || kind == T_OR) {
        int result = kind == T_AND ? YES : NO;
        for (Py_ssize_t i = 1; i < size; i++) {
            int part = judge(PyTuple_GET_ITEM(test, i), a);
            if (part == (kind == T_AND ? NO : YES))
                return part;
            if (part == MAYBE)
                result = MAYBE;
        }
        return result;
    }
    if (a->count < 0 || (kind != T_COMPARE && kind != T_BARE) ||
            !PyUnicode_Check(PyTuple_GET_ITEM(test, 1)))
        return MAYBE;
    const view *value = attribute(a, PyTuple_GET_ITEM(test, 1));
    if (kind == T_BARE && size == 2)
        return value != NULL && value->tag == TRUE;  /* (only True itself) */
    if (kind != T_COMPARE || size != 4)
        return MAYBE;
    long op = number_in(PyTuple_GET_ITEM(test, 2));
    if (op < EQ || op > GE)
        return MAYBE;
    return value == NULL ? NO : compare(value, (int)op, PyTuple_GET_ITEM(test, 3));
}

/* Whether a span named `name` may be where a rule applies, by `tests` (name -> tuple of
 * PlainTest | None). */
static int may_apply(PyObject *tests, PyObject *name, const attribute_views *a) {
    PyObject *found = PyDict_GetItemWithError(tests, name);
    if (found == NULL)
        return PyErr_Occurred() ? -1 : NO;
    if (!PyTuple_Check(found))
        return MAYBE;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(found); i++) {
        PyObject *test = PyTuple_GET_ITEM(found, i);
        if (test == Py_None || judge(test, a) != NO)
            return MAYBE;
    }
    return NO;
}

PyDoc_STRVAR(scan_doc,
"scan(data: bytes, tests: dict, window: tuple[int, int] | None, inside: set, wanted: set)\n\n"
"Read a chunk without making its spans: each trace id with a span starting in `window` (any\n"
"span, without one) goes to `inside`; each trace some rule may apply to, by `tests` (span name\n"
"-> a tuple of PlainTest, or None for any span of the name), to `wanted`, and so does any trace\n"
"this cannot tell of (a trace known by id alone, a start or a value it cannot read). A trace\n"
"not in `wanted` after every chunk of its partition was scanned needs no evaluating.");

static PyObject *scan(PyObject *module, PyObject *args) {
    PyObject *data, *tests, *window, *inside, *wanted;
    if (!PyArg_ParseTuple(args, "O!O!OO!O!:scan", &PyBytes_Type, &data, &PyDict_Type, &tests,
                          &window, &PySet_Type, &inside, &PySet_Type, &wanted))
        return NULL;
    unsigned long long since = 0, until = 0;
    int bounded = window != Py_None, endless = 0;
    if (bounded) {
        if (!PyTuple_Check(window) || PyTuple_GET_SIZE(window) != 2) {
            PyErr_SetString(PyExc_TypeError, "scan: window is (since, until) or None");
            return NULL;
        }
        since = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(window, 0));
        if (since == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
        until = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(window, 1));
        if (until == (unsigned long long)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return NULL;
            PyErr_Clear();  /* 2**64 and beyond: no end */
            endless = 1;
        }
    }
    reader r = {(const unsigned char *)PyBytes_AS_STRING(data), NULL, PyList_New(0)};
    r.end = r.p + PyBytes_GET_SIZE(data);
    uint64_t count, spans;
    attribute_views a = {0, NULL, NULL};
    PyObject *trace_id = NULL;
    if (r.seen == NULL || get_size(&r, &count) < 0)
        goto fail;
    for (uint64_t t = 0; t < count; t++) {
        if ((trace_id = get_value(&r)) == NULL || get_size(&r, &spans) < 0)
            goto fail;
        if (!PyUnicode_CheckExact(trace_id)) {
            corrupt();
            goto fail;
        }
        int in = !bounded || spans == 0, maybe = spans == 0;
        for (uint64_t s = 0; s < spans; s++) {
            view v, name = {0}, start = {0};
            for (int i = 1; i < SLOTS; i++) {
                if (i == ATTRIBUTES) {
                    if (read_attributes(&r, &a) < 0)
                        goto fail;
                } else if (read_view(&r, i == 2 ? &name : i == 4 ? &start : &v) < 0) {
                    goto fail;
                }
            }
            if (start.tag != INT) {
                maybe = 1;  /* (a start past 2**63: _evaluate judges) */
            } else if (!in && start.integer >= 0 &&
                       (unsigned long long)start.integer >= since &&
                       (endless || (unsigned long long)start.integer < until)) {
                in = 1;
            }
            if (!maybe) {
                int verdict = name.shared == NULL ? MAYBE : may_apply(tests, name.shared, &a);
                if (verdict < 0)
                    goto fail;
                maybe = verdict != NO;
            }
            free_attributes(&a);
        }
        if ((in && PySet_Add(inside, trace_id) < 0) || (maybe && PySet_Add(wanted, trace_id) < 0))
            goto fail;
        Py_CLEAR(trace_id);
    }
    if (r.p != r.end) {
        corrupt();
        goto fail;
    }
    Py_DECREF(r.seen);
    Py_RETURN_NONE;
fail:
    free_attributes(&a);
    Py_XDECREF(trace_id);
    Py_XDECREF(r.seen);
    return NULL;
}

/* Read past `spans` spans, making only the shared strs later ones refer to. */
static int pass_over(reader *r, uint64_t spans) {
    view v;
    attribute_views a = {0, NULL, NULL};
    for (uint64_t s = 0; s < spans; s++) {
        for (int i = 1; i < SLOTS; i++) {
            int failed = i == ATTRIBUTES ? read_attributes(r, &a) : read_view(r, &v);
            free_attributes(&a);
            if (failed < 0)
                return -1;
        }
    }
    return 0;
}

/* traces[trace_id], a list made on first use (borrowed). */
static PyObject *bucket_of(PyObject *traces, PyObject *trace_id) {
    if (!PyUnicode_CheckExact(trace_id)) {
        corrupt();
        return NULL;
    }
    PyObject *bucket = PyDict_GetItemWithError(traces, trace_id);
    if (bucket != NULL && !PyList_CheckExact(bucket)) {
        PyErr_SetString(PyExc_TypeError, "unpack: traces must map trace ids to lists");
        return NULL;
    }
    if (bucket != NULL || PyErr_Occurred() || (bucket = PyList_New(0)) == NULL)
        return bucket;
    int failed = PyDict_SetItem(traces, trace_id, bucket);
    Py_DECREF(bucket);  /* (held by traces) */
    return failed ? NULL : bucket;
}

PyDoc_STRVAR(unpack_doc,
"unpack(data: bytes, traces: dict, span_type: type, slots: tuple, empty: dict,\n"
"       only: set | None = None) -> int\n\n"
"What a Packer's part held, each span a new `span_type` (no __init__) with its slots set through\n"
"`slots`, appended to traces[its trace id] (a list, made on first use); the spans read. With\n"
"`only`, the traces whose ids are not in it are passed over, nothing made. A span without\n"
"attributes shares `empty`, which must never be changed.");

static PyObject *unpack(PyObject *module, PyObject *args) {
    PyObject *data, *traces, *slots, *empty, *only = Py_None;
    PyTypeObject *span_type;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!|O:unpack", &PyBytes_Type, &data, &PyDict_Type,
                          &traces, &PyType_Type, &span_type, &PyTuple_Type, &slots, &PyDict_Type,
                          &empty, &only))
        return NULL;
    if (only != Py_None && !PyAnySet_Check(only)) {
        PyErr_SetString(PyExc_TypeError, "unpack: only is a set or None");
        return NULL;
    }
    if (PyTuple_GET_SIZE(slots) != SLOTS) {
        PyErr_SetString(PyExc_ValueError, "unpack: slots of the wrong shape");
        return NULL;
    }
    for (int i = 0; i < SLOTS; i++) {
        if (Py_TYPE(PyTuple_GET_ITEM(slots, i))->tp_descr_set == NULL) {
            PyErr_SetString(PyExc_TypeError, "unpack: slots must be descriptors");
            return NULL;
        }
    }
    reader r = {(const unsigned char *)PyBytes_AS_STRING(data), NULL, PyList_New(0)};
    r.end = r.p + PyBytes_GET_SIZE(data);
    uint64_t count, spans, read = 0;
    if (r.seen == NULL || get_size(&r, &count) < 0)
        goto fail;
    for (uint64_t t = 0; t < count; t++) {
        PyObject *trace_id = get_value(&r);
        int wanted = trace_id == NULL ? -1 : only == Py_None ? 1 : PySet_Contains(only, trace_id);
        PyObject *bucket = wanted == 1 ? bucket_of(traces, trace_id) : NULL;
        if (wanted < 0 || (wanted && bucket == NULL) || get_size(&r, &spans) < 0) {
            Py_XDECREF(trace_id);
            goto fail;
        }
        if (!wanted) {
            Py_DECREF(trace_id);
            if (pass_over(&r, spans) < 0)
                goto fail;
            continue;
        }
        for (uint64_t s = 0; s < spans; s++) {
            PyObject *span = span_type->tp_alloc(span_type, 0);
            int failed = span == NULL || PyList_Append(bucket, span) < 0;
            for (int i = 0; !failed && i < SLOTS; i++) {
                PyObject *value = i == TRACE_ID ? Py_NewRef(trace_id)
                                  : i == ATTRIBUTES ? get_attributes(&r, empty) : get_value(&r);
                PyObject *slot = PyTuple_GET_ITEM(slots, i);
                failed = value == NULL || Py_TYPE(slot)->tp_descr_set(slot, span, value) < 0;
                Py_XDECREF(value);
            }
            Py_XDECREF(span);
            if (failed) {
                Py_DECREF(trace_id);
                goto fail;
            }
        }
        read += spans;
        Py_DECREF(trace_id);
    }
    if (r.p != r.end) {
        corrupt();
        goto fail;
    }
    Py_DECREF(r.seen);
    return PyLong_FromUnsignedLongLong(read);
fail:
    Py_XDECREF(r.seen);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {"unpack", unpack, METH_VARARGS, unpack_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_spill",
    "Replay's spilled spans packed and unpacked in C, for sidecar.replay.partitions.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__spill(void) {
    if (PyType_Ready(&PackerType) < 0)
        return NULL;
    PyObject *made = PyModule_Create(&module);
    if (made != NULL && PyModule_AddObjectRef(made, "Packer", (PyObject *)&PackerType) < 0)
        Py_CLEAR(made);
    return made;
}
