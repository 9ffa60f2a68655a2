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

typedef struct {
    char *data;
    Py_ssize_t size, capacity;
    PyObject *seen;  /* dict: a shared str -> its index, in the order first written */
} writer;

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

/* One value; a str that `shared` says recurs is written once and referred to after. */
static int put_value(writer *w, PyObject *value, int shared) {
    if (value == Py_None)
        return put_tag(w, NONE);
    if (value == Py_True || value == Py_False)
        return put_tag(w, value == Py_True ? TRUE : FALSE);
    if (PyUnicode_CheckExact(value)) {
        if (shared) {
            PyObject *index = PyDict_GetItemWithError(w->seen, value);
            if (index != NULL)
                return put_tag(w, SEEN) < 0 ? -1 : put_size(w, PyLong_AsSize_t(index));
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
    PyMem_Free(self->parts[i].data);
    Py_CLEAR(self->parts[i].seen);
    self->parts[i] = (writer){NULL, 0, 0, NULL};
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

PyDoc_STRVAR(add_doc,
"add(traces: dict[str, list[Span]] | list[tuple[str, list[Span]]]) -> int\n\n"
"Append each trace's spans to its part; the spans added.");

static PyObject *Packer_add(Packer *self, PyObject *traces) {
    if (self->broken) {
        PyErr_SetString(PyExc_RuntimeError, "Packer: an earlier add failed halfway");
        return NULL;
    }
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
    if (self->broken) {
        PyErr_SetString(PyExc_RuntimeError, "Packer: an earlier add failed halfway");
        return NULL;
    }
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
"unpack(data: bytes, traces: dict, span_type: type, slots: tuple, empty: dict) -> int\n\n"
"What a Packer's part held, each span a new `span_type` (no __init__) with its slots set through\n"
"`slots`, appended to traces[its trace id] (a list, made on first use); the spans read. A span\n"
"without attributes shares `empty`, which must never be changed.");

static PyObject *unpack(PyObject *module, PyObject *args) {
    PyObject *data, *traces, *slots, *empty;
    PyTypeObject *span_type;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!:unpack", &PyBytes_Type, &data, &PyDict_Type, &traces,
                          &PyType_Type, &span_type, &PyTuple_Type, &slots, &PyDict_Type, &empty))
        return NULL;
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
        PyObject *bucket = trace_id == NULL ? NULL : bucket_of(traces, trace_id);
        if (bucket == NULL || get_size(&r, &spans) < 0) {
            Py_XDECREF(trace_id);
            goto fail;
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
