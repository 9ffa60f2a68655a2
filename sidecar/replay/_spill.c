/* Replay's spilled traces packed into bytes and unpacked straight into `Span`s, in C: what marshal
 * did with a tuple per span, at about half the cost (tuples made, marshalled, loaded and made into
 * spans again: 3.1 us per span, against 1.7-1.9). The strings a trace's spans share (names, statuses, kinds, services, versions,
 * attribute keys, --group-by values) are written once per pack; the values a rule reads are
 * written as they are (None, bool, int, float, str) and anything else through marshal. See
 * sidecar/replay/partitions.py, the one caller. */

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

static int put_size(writer *w, uint64_t value) {
    unsigned char bytes[10];
    int n = 0;
    do {
        bytes[n++] = (unsigned char)((value & 0x7F) | (value > 0x7F ? 0x80 : 0));
        value >>= 7;
    } while (value);
    return put(w, bytes, n);
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

PyDoc_STRVAR(pack_doc,
"pack(traces: list[tuple[str, list[Span]]], slots: tuple) -> bytes\n\n"
"The traces' spans as bytes for `unpack`: every slot but the trace id, read through `slots`\n"
"(Span's member descriptors, in partitions.py's order).");

static PyObject *pack(PyObject *module, PyObject *args) {
    PyObject *traces, *slots;
    if (!PyArg_ParseTuple(args, "O!O!:pack", &PyList_Type, &traces, &PyTuple_Type, &slots))
        return NULL;
    if (PyTuple_GET_SIZE(slots) != SLOTS) {
        PyErr_SetString(PyExc_ValueError, "pack: slots of the wrong shape");
        return NULL;
    }
    writer w = {PyMem_Malloc(4096), 0, 4096, PyDict_New()};
    PyObject *result = NULL;
    if (w.data == NULL || w.seen == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (put_size(&w, (uint64_t)PyList_GET_SIZE(traces)) < 0)
        goto done;
    for (Py_ssize_t t = 0; t < PyList_GET_SIZE(traces); t++) {
        PyObject *item = PyList_GET_ITEM(traces, t);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2 ||
                !PyList_CheckExact(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "pack: each trace is (trace_id, [Span, ...])");
            goto done;
        }
        PyObject *spans = PyTuple_GET_ITEM(item, 1);
        if (put_value(&w, PyTuple_GET_ITEM(item, 0), 0) < 0 ||
                put_size(&w, (uint64_t)PyList_GET_SIZE(spans)) < 0)
            goto done;
        for (Py_ssize_t s = 0; s < PyList_GET_SIZE(spans); s++) {
            PyObject *span = PyList_GET_ITEM(spans, s);
            for (int i = 0; i < SLOTS; i++) {
                if (i == TRACE_ID)
                    continue;
                PyObject *slot = PyTuple_GET_ITEM(slots, i);
                descrgetfunc get = Py_TYPE(slot)->tp_descr_get;
                PyObject *value = get == NULL ? NULL : get(slot, span, (PyObject *)Py_TYPE(span));
                if (value == NULL) {
                    if (!PyErr_Occurred())
                        PyErr_SetString(PyExc_TypeError, "pack: slots must be descriptors");
                    goto done;
                }
                int failed = i == ATTRIBUTES ? put_attributes(&w, value)
                                             : put_value(&w, value, SHARED[i]);
                Py_DECREF(value);
                if (failed < 0)
                    goto done;
            }
        }
    }
    result = PyBytes_FromStringAndSize(w.data, w.size);
done:
    PyMem_Free(w.data);
    Py_XDECREF(w.seen);
    return result;
}

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

PyDoc_STRVAR(unpack_doc,
"unpack(data: bytes, span_type: type, slots: tuple, empty: dict) -> list[tuple[str, list[Span]]]\n\n"
"What `pack` wrote, each span a new `span_type` (no __init__) with its slots set through\n"
"`slots`; a span without attributes shares `empty`, which must never be changed.");

static PyObject *unpack(PyObject *module, PyObject *args) {
    PyObject *data, *slots, *empty;
    PyTypeObject *span_type;
    if (!PyArg_ParseTuple(args, "O!O!O!O!:unpack", &PyBytes_Type, &data, &PyType_Type, &span_type,
                          &PyTuple_Type, &slots, &PyDict_Type, &empty))
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
    PyObject *traces = NULL;
    uint64_t count, spans;
    if (r.seen == NULL || get_size(&r, &count) < 0 || (traces = PyList_New(0)) == NULL)
        goto fail;
    for (uint64_t t = 0; t < count; t++) {
        PyObject *trace_id = get_value(&r), *bucket = NULL, *item = NULL;
        if (trace_id == NULL || get_size(&r, &spans) < 0 || (bucket = PyList_New(0)) == NULL ||
                (item = PyTuple_Pack(2, trace_id, bucket)) == NULL ||
                PyList_Append(traces, item) < 0) {
            Py_XDECREF(trace_id);
            Py_XDECREF(bucket);
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
        Py_DECREF(bucket);  /* (held by the item in traces) */
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
        Py_DECREF(trace_id);
    }
    if (r.p != r.end) {
        corrupt();
        goto fail;
    }
    Py_DECREF(r.seen);
    return traces;
fail:
    Py_XDECREF(r.seen);
    Py_XDECREF(traces);
    return NULL;
}

static PyMethodDef methods[] = {
    {"pack", pack, METH_VARARGS, pack_doc},
    {"unpack", unpack, METH_VARARGS, unpack_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_spill",
    "Replay's spilled spans packed and unpacked in C, for sidecar.replay.partitions.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__spill(void) {
    return PyModule_Create(&module);
}
