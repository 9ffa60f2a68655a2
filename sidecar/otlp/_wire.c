/* The spans of one OTLP ScopeSpans that a rule selects, found by walking the protobuf wire format
 * in C: a span no rule selects costs a walk over its field headers, not a parse (upb parses only
 * what is kept). See sidecar/otlp/protobuf.py, the one caller. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef const unsigned char *cursor;

/* A varint at *p, which moves past it; 0 when truncated or longer than 10 bytes. */
static int varint(cursor *p, cursor end, uint64_t *value) {
    uint64_t result = 0;
    for (int shift = 0; shift < 70 && *p < end; shift += 7) {
        unsigned char byte = *(*p)++;
        result |= (uint64_t)(byte & 0x7F) << shift;
        if (byte < 0x80) {
            *value = result;
            return 1;
        }
    }
    return 0;
}

/* A field's key at *p: its number and wire type; 0 when it is no valid key (as upb: a number of 0,
 * or a key past 32 bits, whose number would exceed protobuf's 2^29 - 1). */
static int key(cursor *p, cursor end, uint64_t *field, unsigned *type) {
    uint64_t value;
    if (!varint(p, end, &value) || value > UINT32_MAX || value >> 3 == 0)
        return 0;
    *field = value >> 3;
    *type = value & 7;
    return 1;
}

/* A length-delimited field's payload at *p: its start and size, *p moved past it. */
static int delimited(cursor *p, cursor end, cursor *start, uint64_t *size) {
    if (!varint(p, end, size) || *size > (uint64_t)(end - *p))
        return 0;
    *start = *p;
    *p += *size;
    return 1;
}

/* Past one field of wire type `type` at *p; 0 when malformed. Groups (3, 4), which OTLP never
 * uses, count as malformed: upb then decides. */
static int skip(cursor *p, cursor end, unsigned type) {
    uint64_t ignored;
    cursor start;
    switch (type) {
    case 0: return varint(p, end, &ignored);
    case 1: if (end - *p < 8) return 0; *p += 8; return 1;
    case 2: return delimited(p, end, &start, &ignored);
    case 5: if (end - *p < 4) return 0; *p += 4; return 1;
    default: return 0;
    }
}

/* Span.name (field 5; the last one wins, as when upb parses it) of the span in [p, end). */
static int span_name(cursor p, cursor end, cursor *name, uint64_t *size) {
    *name = p;
    *size = 0;
    while (p < end) {
        uint64_t field;
        unsigned type;
        if (!key(&p, end, &field, &type))
            return 0;
        if (field == 5) {
            if (type != 2 || !delimited(&p, end, name, size))
                return 0;
        } else if (!skip(&p, end, type)) {
            return 0;
        }
    }
    return 1;
}

static int wanted(PyObject *names, cursor name, uint64_t size) {
    Py_ssize_t count = PyTuple_GET_SIZE(names);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *candidate = PyTuple_GET_ITEM(names, i);
        if ((uint64_t)PyBytes_GET_SIZE(candidate) == size &&
            memcmp(PyBytes_AS_STRING(candidate), name, size) == 0)
            return 1;
    }
    return 0;
}

typedef struct {
    cursor start;
    Py_ssize_t size;
} range;

PyDoc_STRVAR(select_spans_doc,
"select_spans(scope_spans: bytes, names: tuple[bytes, ...]) -> tuple[int, bytes | None] | None\n\n"
"The spans of a serialized ScopeSpans whose name is one of `names` (UTF-8 bytes): (how many\n"
"spans it holds, a ScopeSpans of the selected spans alone), where the second item is\n"
"`scope_spans` itself when every span is selected and None when none is; None for the whole\n"
"when the bytes are not well-formed protobuf, for the caller's parser to say why.");

static PyObject *select_spans(PyObject *module, PyObject *args) {
    PyObject *scope, *names;
    if (!PyArg_ParseTuple(args, "O!O!:select_spans", &PyBytes_Type, &scope, &PyTuple_Type, &names))
        return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(names, i))) {
            PyErr_SetString(PyExc_TypeError, "select_spans: names must be bytes");
            return NULL;
        }
    }
    cursor p = (cursor)PyBytes_AS_STRING(scope), end = p + PyBytes_GET_SIZE(scope);
    range small[64], *kept = small;
    Py_ssize_t spans = 0, count = 0, capacity = 64, total = 0;
    PyObject *result = NULL;
    while (p < end) {
        cursor start = p, span;
        uint64_t field, size;
        unsigned type;
        if (!key(&p, end, &field, &type))
            goto malformed;
        if (field != 2) {  /* the scope, its schema_url: not needed */
            if (!skip(&p, end, type))
                goto malformed;
            continue;
        }
        cursor name;
        uint64_t name_size;
        if (type != 2 || !delimited(&p, end, &span, &size) ||
            !span_name(span, span + size, &name, &name_size))
            goto malformed;
        spans++;
        if (!wanted(names, name, name_size))
            continue;
        if (count == capacity) {
            range *grown = PyMem_Malloc(sizeof(range) * (size_t)capacity * 2);
            if (grown == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            memcpy(grown, kept, sizeof(range) * (size_t)count);
            if (kept != small)
                PyMem_Free(kept);
            kept = grown;
            capacity *= 2;
        }
        kept[count].start = start;
        kept[count].size = p - start;
        total += p - start;
        count++;
    }
    if (count == spans) {
        result = Py_BuildValue("(nO)", spans, count ? scope : Py_None);
    } else if (count == 0) {
        result = Py_BuildValue("(nO)", spans, Py_None);
    } else {
        PyObject *selected = PyBytes_FromStringAndSize(NULL, total);
        if (selected == NULL)
            goto done;
        char *out = PyBytes_AS_STRING(selected);
        for (Py_ssize_t i = 0; i < count; i++) {
            memcpy(out, kept[i].start, (size_t)kept[i].size);
            out += kept[i].size;
        }
        result = Py_BuildValue("(nN)", spans, selected);
    }
    goto done;
malformed:
    result = Py_NewRef(Py_None);
done:
    if (kept != small)
        PyMem_Free(kept);
    return result;
}

static PyMethodDef methods[] = {
    {"select_spans", select_spans, METH_VARARGS, select_spans_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wire",
    "OTLP protobuf wire-format scanning in C, for sidecar.otlp.protobuf.", -1, methods,
};

PyMODINIT_FUNC PyInit__wire(void) {
    return PyModule_Create(&module);
}
