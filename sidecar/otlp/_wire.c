/* The spans of one serialized OTLP ScopeSpans decoded in C, straight from the protobuf wire format:
 * a span no rule selects costs a walk over its field headers; a selected one becomes a `Span`
 * holding only the attributes its rules read. The wire format is read as upb reads it (the last
 * of a repeated singular field wins, a field of an unexpected wire type is skipped as unknown,
 * groups are skipped), so a span it decodes is refused where upb would refuse it (a span no rule
 * selects is only framed, never checked further). See sidecar/otlp/protobuf.py, the one caller,
 * which builds the plan. The same plan serves the OTLP JSON decoder at the end of this file
 * (decode_json, called by sidecar/otlp/json_spans.py). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef const unsigned char *cursor;

static const char CORRUPT[] = "Wire format was corrupt";  /* upb's words, for the same faults */
static const char BAD_UTF8[] = "String field had bad UTF-8";
#define SLOTS 12  /* Span's slots, in the order of sidecar.model.spans.SLOT_DESCRIPTORS */
#define MAX_GROUP_DEPTH 100  /* upb's default recursion limit */

/* A varint of at most `bytes` bytes at *p, which moves past it; 0 when truncated or longer. */
static int varint_of(cursor *p, cursor end, uint64_t *value, int bytes) {
    uint64_t result = 0;
    for (int shift = 0; shift < 7 * bytes && *p < end; shift += 7) {
        unsigned char byte = *(*p)++;
        result |= (uint64_t)(byte & 0x7F) << shift;
        if (byte < 0x80) {
            *value = result;
            return 1;
        }
    }
    return 0;
}

/* A value's varint: up to 10 bytes. Keys and lengths take up to 5, as upb reads them. */
static int varint(cursor *p, cursor end, uint64_t *value) {
    return varint_of(p, end, value, 10);
}

/* A field's key at *p: its number and wire type; 0 when it is no valid key (as upb: a number of 0,
 * or a key past 32 bits, whose number would exceed protobuf's 2^29 - 1). */
static int key(cursor *p, cursor end, uint32_t *field, unsigned *type) {
    uint64_t value;
    if (!varint_of(p, end, &value, 5) || value > UINT32_MAX || value >> 3 == 0)
        return 0;
    *field = (uint32_t)(value >> 3);
    *type = value & 7;
    return 1;
}

/* A length-delimited field's payload at *p: its start and size, *p moved past it. */
static int delimited(cursor *p, cursor end, cursor *start, Py_ssize_t *size) {
    uint64_t length;
    if (!varint_of(p, end, &length, 5) || length > (uint64_t)(end - *p))
        return 0;
    *start = *p;
    *size = (Py_ssize_t)length;
    *p += length;
    return 1;
}

static int fixed64(cursor *p, cursor end, uint64_t *value) {
    if (end - *p < 8)
        return 0;
    memcpy(value, *p, 8);  /* little-endian on every platform CPython wheels target here */
    *p += 8;
    return 1;
}

/* Past one field of wire type `type` (number `field`) at *p; 0 when malformed. */
static int skip(cursor *p, cursor end, unsigned type, uint32_t field, int depth) {
    uint64_t ignored;
    cursor start;
    Py_ssize_t size;
    switch (type) {
    case 0: return varint(p, end, &ignored);
    case 1: return fixed64(p, end, &ignored);
    case 2: return delimited(p, end, &start, &size);
    case 3:  /* a group: its fields, up to the end-group key of the same number */
        if (depth >= MAX_GROUP_DEPTH)
            return 0;
        while (*p < end) {
            uint32_t inner;
            unsigned inner_type;
            if (!key(p, end, &inner, &inner_type))
                return 0;
            if (inner_type == 4)
                return inner == field;
            if (!skip(p, end, inner_type, inner, depth + 1))
                return 0;
        }
        return 0;
    case 5: if (end - *p < 4) return 0; *p += 4; return 1;
    default: return 0;  /* an end-group outside its group, or wire type 6 or 7 */
    }
}

static int ascii(cursor p, Py_ssize_t size) {
    for (Py_ssize_t i = 0; i < size; i++)
        if (p[i] >= 0x80)
            return 0;
    return 1;
}

/* 1 when [p, p + size) is UTF-8 as upb and Python's strict codec define it; -1 on a Python
 * error other than the codec's own. */
static int utf8(cursor p, Py_ssize_t size) {
    if (ascii(p, size))
        return 1;
    PyObject *text = PyUnicode_DecodeUTF8((const char *)p, size, NULL);
    if (text != NULL) {
        Py_DECREF(text);
        return 1;
    }
    if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
        return -1;
    PyErr_Clear();
    return 0;
}

/* The fields of one span that decoding reads (the last of each wins; absent ones empty or 0). */
typedef struct {
    cursor trace_id, span_id, parent, name, status;
    Py_ssize_t trace_id_size, span_id_size, parent_size, name_size, status_size;
    uint64_t start, end;
    uint32_t kind;
    int has_status;
} fields;

/* One walk over a span's fields; 0 when its wire format is malformed. */
static int span_fields(cursor p, cursor end, fields *f) {
    memset(f, 0, sizeof *f);
    f->trace_id = f->span_id = f->parent = f->name = f->status = p;
    while (p < end) {
        uint32_t field;
        unsigned type;
        uint64_t value = 0;
        cursor ignored;
        Py_ssize_t size;
        if (!key(&p, end, &field, &type))
            return 0;
        int ok = 1, known = 1;
        switch (field * 8 + type) {
        case 1 * 8 + 2: ok = delimited(&p, end, &f->trace_id, &f->trace_id_size); break;
        case 2 * 8 + 2: ok = delimited(&p, end, &f->span_id, &f->span_id_size); break;
        case 4 * 8 + 2: ok = delimited(&p, end, &f->parent, &f->parent_size); break;
        case 5 * 8 + 2: ok = delimited(&p, end, &f->name, &f->name_size); break;
        case 6 * 8 + 0: ok = varint(&p, end, &value); f->kind = (uint32_t)value; break;
        case 7 * 8 + 1: ok = fixed64(&p, end, &f->start); break;
        case 8 * 8 + 1: ok = fixed64(&p, end, &f->end); break;
        case 9 * 8 + 2: ok = delimited(&p, end, &ignored, &size); break;  /* see attributes() */
        case 15 * 8 + 2:
            ok = delimited(&p, end, &f->status, &f->status_size);
            f->has_status = 1;
            break;
        default: known = 0;
        }
        if (!(known ? ok : skip(&p, end, type, field, 0)))
            return 0;
    }
    return 1;
}

/* What protobuf.py's plan holds, unpacked once per call. */
typedef struct {
    PyObject *reads;     /* dict: name (UTF-8 bytes) -> None | own | (name, keys: tuple | None) */
    PyObject *classify;  /* callable(name bytes) -> selection, storing it; or None: unselected */
    PyObject *own;       /* the selection of BeTrace's own violation spans */
    PyTypeObject *span_type;
    PyObject *slots;     /* Span's member descriptors, in SLOTS order */
    PyObject *kinds, *statuses;  /* tuples of str, by number */
    PyObject *any_value, *status_of;  /* callable(bytes): the rare forms; raise ValueError */
    PyObject *no_attributes;  /* the shared empty dict */
    unsigned long long since, last;  /* the window: since <= start <= last */
} plan;

static PyObject *hex(cursor p, Py_ssize_t size) {
    static const char digits[] = "0123456789abcdef";
    PyObject *text = PyUnicode_New(size * 2, 127);
    if (text == NULL)
        return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(text);
    for (Py_ssize_t i = 0; i < size; i++) {
        out[2 * i] = (Py_UCS1)digits[p[i] >> 4];
        out[2 * i + 1] = (Py_UCS1)digits[p[i] & 15];
    }
    return text;
}

static int zero(cursor p, Py_ssize_t size) {
    for (Py_ssize_t i = 0; i < size; i++)
        if (p[i])
            return 0;
    return 1;
}

/* An AnyValue's bytes as rules see them: one string, bool, int or double field decoded here (nearly
 * every value), anything else by the plan's any_value. NULL with a Python error. */
static PyObject *any_value(const plan *plan, cursor p, Py_ssize_t size) {
    cursor q = p, end = p + size, text;
    uint32_t field;
    unsigned type;
    uint64_t value;
    Py_ssize_t length;
    if (key(&q, end, &field, &type)) {
        switch (field * 8 + type) {
        case 1 * 8 + 2:
            if (delimited(&q, end, &text, &length) && q == end)
                return PyUnicode_DecodeUTF8((const char *)text, length, NULL);
            break;
        case 2 * 8 + 0:
            if (varint(&q, end, &value) && q == end)
                return PyBool_FromLong(value != 0);
            break;
        case 3 * 8 + 0:
            if (varint(&q, end, &value) && q == end)
                return PyLong_FromLongLong((long long)value);
            break;
        case 4 * 8 + 1:
            if (fixed64(&q, end, &value) && q == end) {
                double number;
                memcpy(&number, &value, 8);
                return PyFloat_FromDouble(number);
            }
            break;
        }
    }
    PyObject *raw = PyBytes_FromStringAndSize((const char *)p, size);
    if (raw == NULL)
        return NULL;
    PyObject *decoded = PyObject_CallOneArg(plan->any_value, raw);
    Py_DECREF(raw);
    return decoded;
}

/* The str in `keys` (a tuple) whose UTF-8 is [k, k + size), borrowed; NULL when none is. */
static PyObject *wanted_key(PyObject *keys, cursor k, Py_ssize_t size) {
    Py_ssize_t count = PyTuple_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *candidate = PyTuple_GET_ITEM(keys, i);
        Py_ssize_t candidate_size;
        const char *bytes = PyUnicode_AsUTF8AndSize(candidate, &candidate_size);
        if (bytes == NULL)
            PyErr_Clear();  /* (a key that is no UTF-8 text matches nothing) */
        else if (candidate_size == size && memcmp(bytes, k, (size_t)size) == 0)
            return candidate;
    }
    return NULL;
}

/* The attributes of the span in [p, end) that `keys` names (Py_None: every one), into *out (the
 * plan's shared empty dict when none). Returns 1, or 0 with *reason set when the span is refused
 * for its wire format or a key, or -1 with a Python error (a ValueError: the value is refused). */
static int attributes(const plan *plan, cursor p, cursor end, PyObject *keys, PyObject **out,
                      const char **reason) {
    PyObject *found = NULL;
    while (p < end) {
        uint32_t field;
        unsigned type;
        if (!key(&p, end, &field, &type))
            goto corrupt;
        if (field != 9 || type != 2) {
            if (!skip(&p, end, type, field, 0))
                goto corrupt;
            continue;
        }
        cursor kv, kv_end, k = p, v = p;
        Py_ssize_t kv_size, k_size = 0, v_size = 0;
        if (!delimited(&p, end, &kv, &kv_size))
            goto corrupt;
        kv_end = kv + kv_size;
        while (kv < kv_end) {  /* KeyValue: key (1, string), value (2, AnyValue); last wins */
            uint32_t inner;
            unsigned inner_type;
            if (!key(&kv, kv_end, &inner, &inner_type))
                goto corrupt;
            if (inner == 1 && inner_type == 2) {
                if (!delimited(&kv, kv_end, &k, &k_size))
                    goto corrupt;
            } else if (inner == 2 && inner_type == 2) {
                if (!delimited(&kv, kv_end, &v, &v_size))
                    goto corrupt;
            } else if (!skip(&kv, kv_end, inner_type, inner, 1)) {  /* a level down */
                goto corrupt;
            }
        }
        int valid = utf8(k, k_size);
        if (valid < 0)
            goto error;
        if (!valid) {
            *reason = BAD_UTF8;
            goto refused;
        }
        PyObject *name;
        if (keys == Py_None) {
            name = PyUnicode_DecodeUTF8((const char *)k, k_size, NULL);
            if (name == NULL)
                goto error;
        } else {
            name = wanted_key(keys, k, k_size);
            if (name == NULL)
                continue;
            Py_INCREF(name);
        }
        PyObject *value = any_value(plan, v, v_size);
        if (value == NULL || (found == NULL && (found = PyDict_New()) == NULL) ||
                PyDict_SetItem(found, name, value) < 0) {
            Py_DECREF(name);
            Py_XDECREF(value);
            goto error;
        }
        Py_DECREF(name);
        Py_DECREF(value);
    }
    *out = found != NULL ? found : Py_NewRef(plan->no_attributes);
    return 1;
corrupt:
    *reason = CORRUPT;
refused:
    Py_XDECREF(found);
    return 0;
error:
    Py_XDECREF(found);
    return -1;
}

/* A span's Status: its code (3) as a str; the message (2) only checked to be UTF-8. What is
 * malformed goes to the plan's status_of, which says why. */
static PyObject *status(const plan *plan, const fields *f) {
    cursor p = f->status, end = f->status + f->status_size;
    uint64_t code = 0;
    int well_formed = 1;
    while (well_formed && p < end) {
        uint32_t field;
        unsigned type;
        cursor message;
        Py_ssize_t size;
        if (!key(&p, end, &field, &type)) {
            well_formed = 0;
        } else if (field == 3 && type == 0) {
            well_formed = varint(&p, end, &code);
        } else if (field == 2 && type == 2) {
            int valid = delimited(&p, end, &message, &size) ? utf8(message, size) : 0;
            if (valid < 0)
                return NULL;
            well_formed = valid;
        } else {
            well_formed = skip(&p, end, type, field, 0);
        }
    }
    if (well_formed) {
        int32_t number = (int32_t)(uint32_t)code;  /* an enum is an int32, as upb reads it */
        return Py_NewRef(PyTuple_GET_ITEM(plan->statuses, number >= 0 && number < 3 ? number : 0));
    }
    PyObject *raw = PyBytes_FromStringAndSize((const char *)f->status, f->status_size);
    if (raw == NULL)
        return NULL;
    PyObject *decoded = PyObject_CallOneArg(plan->status_of, raw);
    Py_DECREF(raw);
    return decoded;
}

static int refuse(PyObject *invalid, PyObject *reason) {
    if (reason == NULL)
        return -1;
    int failed = PyList_Append(invalid, reason);
    Py_DECREF(reason);
    return failed;
}

/* Refuse the span for an id of the wrong size, or all zeros. */
static int refuse_id(PyObject *invalid, PyObject *name, const char *which, cursor id,
                     Py_ssize_t size) {
    PyObject *text = hex(id, size);
    int failed = text == NULL ? -1 : refuse(invalid, PyUnicode_FromFormat(
        "span %R: invalid %s %R", name, which, text));
    Py_XDECREF(text);
    return failed;
}

/* Refuse the span for the ValueError being raised, if it is one: 0 done, -1 another error. */
static int refuse_value(PyObject *invalid, PyObject *name) {
    if (!PyErr_ExceptionMatches(PyExc_ValueError))
        return -1;
    PyObject *type, *error, *traceback;
    PyErr_Fetch(&type, &error, &traceback);
    PyErr_NormalizeException(&type, &error, &traceback);
    int failed = refuse(invalid, PyUnicode_FromFormat(
        "span %R: invalid attribute or status: %S", name, error));
    Py_XDECREF(type);
    Py_XDECREF(error);
    Py_XDECREF(traceback);
    return failed;
}

/* Per call: the resource's values and where the spans go. */
typedef struct {
    PyObject *service, *version, *group, *batch, *hex_ids, *invalid, *bare;
    Py_ssize_t own;
    /* the last trace a span was added to: spans of one trace come together */
    unsigned char last_id[16];
    PyObject *last_bucket;  /* borrowed from batch */
    PyObject *last_hex;     /* borrowed from hex_ids */
} sink;

static PyObject *make_span(const plan *plan, PyObject *values[SLOTS]) {
    PyObject *span = plan->span_type->tp_alloc(plan->span_type, 0);
    if (span == NULL)
        return NULL;
    for (int i = 0; i < SLOTS; i++) {
        PyObject *slot = PyTuple_GET_ITEM(plan->slots, i);
        if (Py_TYPE(slot)->tp_descr_set(slot, span, values[i]) < 0) {
            Py_DECREF(span);
            return NULL;
        }
    }
    return span;
}

/* The bucket of trace `id` in the batch, made on first use (borrowed); its hex id in *hex_id. */
static PyObject *bucket(sink *s, cursor id, PyObject **hex_id) {
    if (s->last_bucket != NULL && memcmp(s->last_id, id, 16) == 0) {
        *hex_id = s->last_hex;
        return s->last_bucket;
    }
    PyObject *fresh = hex(id, 16);
    if (fresh == NULL)
        return NULL;
    PyObject *shared = PyDict_SetDefault(s->hex_ids, fresh, fresh);  /* one str per trace */
    Py_DECREF(fresh);
    if (shared == NULL)
        return NULL;
    PyObject *spans = PyDict_GetItemWithError(s->batch, shared);
    if (spans == NULL) {
        if (PyErr_Occurred() || (spans = PyList_New(0)) == NULL)
            return NULL;
        int failed = PyDict_SetItem(s->batch, shared, spans);
        Py_DECREF(spans);
        if (failed)
            return NULL;
    }
    memcpy(s->last_id, id, 16);
    s->last_bucket = spans;
    s->last_hex = *hex_id = shared;
    return spans;
}

/* What the plan selects of spans named [name, name + size) (a new reference): None, the plan's
 * own, or (the name as str, the attribute keys to read: a tuple, or None for every one). NULL
 * with a Python error (UnicodeDecodeError: the plan's classify found the name no UTF-8). */
static PyObject *selection_of(const plan *plan, cursor name, Py_ssize_t size) {
    PyObject *text = PyBytes_FromStringAndSize((const char *)name, size);
    if (text == NULL)
        return NULL;
    PyObject *selection = PyDict_GetItemWithError(plan->reads, text);  /* borrowed */
    if (selection != NULL)
        Py_INCREF(selection);
    else if (!PyErr_Occurred())
        selection = plan->classify == Py_None ? Py_NewRef(Py_None)
                                              : PyObject_CallOneArg(plan->classify, text);
    Py_DECREF(text);
    return selection;
}

/* 0 when a selection has one of the shapes selection_of names, else -1 with a TypeError. */
static int check_selection(PyObject *selection) {
    if (selection == Py_None || (PyTuple_CheckExact(selection) &&
            PyTuple_GET_SIZE(selection) == 2 && (PyTuple_GET_ITEM(selection, 1) == Py_None ||
                                                 PyTuple_CheckExact(PyTuple_GET_ITEM(selection, 1)))))
        return 0;
    PyErr_SetString(PyExc_TypeError, "a selection is None, the plan's own or "
                                     "(name, keys: tuple | None)");
    return -1;
}

/* One span: refused (in s->invalid), not selected, BeTrace's own, or added to the batch.
 * -1 with a Python error. */
static int decode_span(const plan *plan, sink *s, cursor p, cursor end) {
    fields f;
    if (!span_fields(p, end, &f))
        return refuse(s->invalid, PyUnicode_FromFormat("invalid span (%zd bytes): %s",
                                                        (Py_ssize_t)(end - p), CORRUPT));
    PyObject *selection = selection_of(plan, f.name, f.name_size);
    if (selection == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            return -1;
        PyErr_Clear();
        return refuse(s->invalid, PyUnicode_FromFormat("invalid span (%zd bytes): %s",
                                                        (Py_ssize_t)(end - p), BAD_UTF8));
    }
    if (check_selection(selection) < 0) {
        Py_DECREF(selection);
        return -1;
    }
    int result = 0;
    int in_window = plan->since <= f.start && f.start <= plan->last;
    if (selection == Py_None) {
        if (s->bare != Py_None && f.trace_id_size == 16 && !zero(f.trace_id, 16) && in_window) {
            PyObject *id = PyBytes_FromStringAndSize((const char *)f.trace_id, 16);
            result = id == NULL ? -1 : PySet_Add(s->bare, id);
            Py_XDECREF(id);
        }
        goto done;
    }
    if (selection == plan->own) {
        s->own++;
        goto done;
    }
    if (!in_window)
        goto done;
    PyObject *span_name = PyTuple_GET_ITEM(selection, 0), *keys = PyTuple_GET_ITEM(selection, 1);
    if (f.trace_id_size != 16 || zero(f.trace_id, 16)) {
        result = refuse_id(s->invalid, span_name, "trace_id", f.trace_id, f.trace_id_size);
        goto done;
    }
    if (f.span_id_size != 8 || zero(f.span_id, 8)) {
        result = refuse_id(s->invalid, span_name, "span_id", f.span_id, f.span_id_size);
        goto done;
    }
    PyObject *found = NULL, *state = NULL;
    const char *reason = NULL;
    int read = attributes(plan, p, end, keys, &found, &reason);
    if (read == 0) {
        result = refuse(s->invalid, PyUnicode_FromFormat(
            "invalid span (%zd bytes): %s", (Py_ssize_t)(end - p), reason));
        goto done;
    }
    if (read < 0 || (state = status(plan, &f)) == NULL) {
        Py_XDECREF(found);
        result = refuse_value(s->invalid, span_name);
        goto done;
    }
    PyObject *hex_id = NULL, *spans = bucket(s, f.trace_id, &hex_id);
    if (spans == NULL) {
        Py_DECREF(found);
        Py_DECREF(state);
        result = -1;
        goto done;
    }
    PyObject *span_id = hex(f.span_id, 8);
    PyObject *parent = f.parent_size == 8 && zero(f.parent, 8) ? PyUnicode_New(0, 0)
                                                               : hex(f.parent, f.parent_size);
    PyObject *start = PyLong_FromUnsignedLongLong(f.start);
    PyObject *stop = PyLong_FromUnsignedLongLong(f.end);
    PyObject *kind = PyTuple_GET_ITEM(plan->kinds, f.kind < 6 ? f.kind : 0);
    if (span_id == NULL || parent == NULL || start == NULL || stop == NULL) {
        result = -1;
    } else {
        PyObject *values[SLOTS] = {hex_id, span_id, span_name, parent, start, stop, state, kind,
                                   s->service, s->version, found, s->group};
        PyObject *span = make_span(plan, values);
        result = span == NULL ? -1 : PyList_Append(spans, span);
        Py_XDECREF(span);
    }
    Py_DECREF(found);
    Py_DECREF(state);
    Py_XDECREF(span_id);
    Py_XDECREF(parent);
    Py_XDECREF(start);
    Py_XDECREF(stop);
done:
    Py_DECREF(selection);
    return result;
}

static int parse_plan(PyObject *args, plan *plan) {
    if (!PyArg_ParseTuple(args, "O!OOO!O!O!O!OOO!KK:plan",
                          &PyDict_Type, &plan->reads, &plan->classify, &plan->own,
                          &PyType_Type, &plan->span_type, &PyTuple_Type, &plan->slots,
                          &PyTuple_Type, &plan->kinds, &PyTuple_Type, &plan->statuses,
                          &plan->any_value, &plan->status_of, &PyDict_Type, &plan->no_attributes,
                          &plan->since, &plan->last))
        return -1;
    if (PyTuple_GET_SIZE(plan->slots) != SLOTS || PyTuple_GET_SIZE(plan->kinds) != 6 ||
            PyTuple_GET_SIZE(plan->statuses) != 3) {
        PyErr_SetString(PyExc_ValueError, "a plan of the wrong shape");
        return -1;
    }
    for (int i = 0; i < SLOTS; i++) {
        if (Py_TYPE(PyTuple_GET_ITEM(plan->slots, i))->tp_descr_set == NULL) {
            PyErr_SetString(PyExc_TypeError, "the plan's slots must be descriptors");
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(decode_scope_doc,
"decode_scope(scope_spans: bytes, plan: tuple, resource: tuple, batch: dict, hex_ids: dict,\n"
"             invalid: list, bare: set | None) -> tuple[int, int, int]\n\n"
"Decode the spans of a serialized ScopeSpans as `plan` says (see protobuf.py): each selected\n"
"span is appended to batch[its hex trace id] as a Span carrying `resource` (service, version,\n"
"group); a refused span's reason goes to `invalid`; with `bare`, the trace ids of unselected\n"
"spans are added to it. Returns (spans received, BeTrace's own spans, spans refused). A scope\n"
"whose own framing is broken counts as one span, refused.");

static PyObject *decode_scope(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    plan plan;
    sink s = {0};
    PyObject *scope, *plan_args, *resource;
    if (nargs != 7 || !PyBytes_Check(args[0]) || !PyTuple_Check(args[1]) ||
            !PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) != 3 ||
            !PyDict_CheckExact(args[3]) || !PyDict_CheckExact(args[4]) ||
            !PyList_CheckExact(args[5]) || (args[6] != Py_None && !PySet_Check(args[6]))) {
        PyErr_SetString(PyExc_TypeError, "decode_scope(bytes, tuple, (service, version, group), "
                                         "dict, dict, list, set | None)");
        return NULL;
    }
    scope = args[0];
    plan_args = args[1];
    resource = args[2];
    if (parse_plan(plan_args, &plan) < 0)
        return NULL;
    s.service = PyTuple_GET_ITEM(resource, 0);
    s.version = PyTuple_GET_ITEM(resource, 1);
    s.group = PyTuple_GET_ITEM(resource, 2);
    s.batch = args[3];
    s.hex_ids = args[4];
    s.invalid = args[5];
    s.bare = args[6];

    cursor start = (cursor)PyBytes_AS_STRING(scope), end = start + PyBytes_GET_SIZE(scope), p;
    Py_ssize_t received = 0, invalid = PyList_GET_SIZE(s.invalid);
    for (p = start; p < end;) {  /* the scope's own framing first: a broken one keeps nothing */
        uint32_t field;
        unsigned type;
        if (!key(&p, end, &field, &type) || !skip(&p, end, type, field, 0)) {
            if (refuse(s.invalid, PyUnicode_FromFormat("invalid ScopeSpans (%zd bytes): %s",
                                                        (Py_ssize_t)(end - start), CORRUPT)))
                return NULL;
            return Py_BuildValue("(nnn)", (Py_ssize_t)1, (Py_ssize_t)0, (Py_ssize_t)1);
        }
        received += field == 2 && type == 2;
    }
    for (p = start; p < end;) {  /* (the walk above found every step of this one valid) */
        uint32_t field = 0;
        unsigned type = 0;
        cursor span = p;
        Py_ssize_t size = 0;
        key(&p, end, &field, &type);
        if (field != 2 || type != 2) {
            skip(&p, end, type, field, 0);
            continue;
        }
        delimited(&p, end, &span, &size);
        if (decode_span(&plan, &s, span, span + size) < 0)
            return NULL;
    }
    return Py_BuildValue("(nnn)", received, s.own, PyList_GET_SIZE(s.invalid) - invalid);
}

/* --- OTLP JSON -----------------------------------------------------------------------------------
 * An ExportTraceServiceRequest as protobuf's JSON mapping writes it (OTLP/HTTP JSON, the
 * collector's file exporter) decoded in one pass, in its common shape, into the spans, counts and
 * trace ids the Python passes of sidecar/otlp/json_spans.py give. Whatever is outside that shape
 * makes it give up (decode_json returns None) and the Python passes decode the request, and word
 * what is wrong: malformed JSON, a span or request they would refuse, ids in base64, an escaped
 * object key or span name, an array, kvlist or bytes among the values read, a known member twice,
 * a resource after its spans, numbers past 18 digits. As in Python, a span no rule selects is
 * read for its name only, and only the attributes its rules read are decoded. */

#define JSON_DEPTH 64
enum { GIVE_UP = 0, DONE = 1 };  /* or -1: a Python error */
enum { BAD, END, NEXT };          /* walking an object's members or an array's elements */

static void blank(cursor *p, cursor end) {
    while (*p < end && (**p == ' ' || **p == '\n' || **p == '\r' || **p == '\t'))
        (*p)++;
}

static int word(cursor *p, cursor end, const char *text, Py_ssize_t size) {
    if (end - *p < size || memcmp(*p, text, (size_t)size) != 0)
        return 0;
    *p += size;
    return 1;
}
#define WORD(p, end, text) word(p, end, text, (Py_ssize_t)sizeof(text) - 1)
#define IS(k, size, text) ((size) == (Py_ssize_t)sizeof(text) - 1 && memcmp(k, text, (size)) == 0)

static int hex_digit(unsigned char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* Past one UTF-8 sequence whose first byte (>= 0x80) is at *p, as Python's strict codec takes it:
 * no overlong form, no surrogate, nothing past U+10FFFF. */
static int utf8_sequence(cursor *p, cursor end) {
    cursor q = *p;
    int more;
    uint32_t least, code;
    if (*q >= 0xC2 && *q <= 0xDF) {
        more = 1, least = 0x80, code = *q & 0x1F;
    } else if (*q >= 0xE0 && *q <= 0xEF) {
        more = 2, least = 0x800, code = *q & 0x0F;
    } else if (*q >= 0xF0 && *q <= 0xF4) {
        more = 3, least = 0x10000, code = *q & 0x07;
    } else {
        return 0;
    }
    if (end - q <= more)
        return 0;
    for (int i = 1; i <= more; i++) {
        if ((q[i] & 0xC0) != 0x80)
            return 0;
        code = code << 6 | (q[i] & 0x3F);
    }
    if (code < least || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF))
        return 0;
    *p = q + more + 1;
    return 1;
}

/* 1 for the bytes a JSON string holds as they are: ASCII but controls, '"' and '\\'. */
static const unsigned char PLAIN[256] = {
#define SIXTEEN 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1
    [0x20] = 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,  /* '"' */
    [0x30] = SIXTEEN, SIXTEEN, SIXTEEN,
    [0x5C] = 0, 1, 1, 1,  /* '\\' */
    [0x60] = SIXTEEN, SIXTEEN,
#undef SIXTEEN
};

/* The code unit of the \\uXXXX escape at q; past 0xFFFF when there is none. */
static uint32_t escaped_unit(cursor q, cursor end) {
    uint32_t code = 0;
    if (end - q < 6 || q[0] != '\\' || q[1] != 'u')
        return 0x10000;
    for (int i = 2; i < 6; i++) {
        int digit = hex_digit(q[i]);
        if (digit < 0)
            return 0x10000;
        code = code << 4 | (uint32_t)digit;
    }
    return code;
}

/* 1 when the 8 bytes at q are all PLAIN: no byte is '"', '\\', below 0x20 or above 0x7F
 * (each test true of the word when true of one of its bytes). */
static int plain8(cursor q) {
    const uint64_t ones = 0x0101010101010101u, highs = 0x8080808080808080u;
    uint64_t x, quote, backslash;
    memcpy(&x, q, 8);
    quote = x ^ (ones * '"');
    backslash = x ^ (ones * '\\');
    return !((((quote - ones) & ~quote) | ((backslash - ones) & ~backslash) |
              ((x - ones * 0x20) & ~x) | x) & highs);
}

/* The JSON string at *p (its opening quote): its text [*text, *text + *size) as written, and
 * whether it holds an escape; *p moved past it. 0 when malformed: no end, a control character,
 * an unknown escape, bad UTF-8. */
static int string(cursor *p, cursor end, cursor *text, Py_ssize_t *size, int *escaped) {
    if (*p >= end || **p != '"')
        return 0;
    cursor q = *p + 1;
    *text = q;
    *escaped = 0;
    while (q < end) {
        while (end - q >= 8 && plain8(q))
            q += 8;
        while (q < end && PLAIN[*q])
            q++;
        if (q >= end)
            break;
        if (*q == '"') {
            *size = q - *text;
            *p = q + 1;
            return 1;
        }
        if (*q < 0x20)
            return 0;
        if (*q == '\\') {
            *escaped = 1;
            if (end - q < 2)
                return 0;
            switch (q[1]) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                q += 2;
                break;
            case 'u': {  /* a surrogate only in a pair: the Python passes refuse a lone one */
                uint32_t code = escaped_unit(q, end);
                if (code > 0xFFFF || (code >= 0xDC00 && code <= 0xDFFF))
                    return 0;
                if (code >= 0xD800 && code <= 0xDBFF) {
                    uint32_t low = escaped_unit(q + 6, end);
                    if (low < 0xDC00 || low > 0xDFFF)
                        return 0;
                    q += 6;
                }
                q += 6;
                break;
            }
            default:
                return 0;
            }
        } else if (*q >= 0x80) {
            if (!utf8_sequence(&q, end))
                return 0;
        } else {
            q++;
        }
    }
    return 0;
}

/* Past a JSON number at *p, *integer when it has no fraction or exponent. */
static int number_text(cursor *p, cursor end, int *integer) {
    cursor q = *p;
    if (q < end && *q == '-')
        q++;
    if (q >= end || *q < '0' || *q > '9')
        return 0;
    if (*q++ != '0')
        while (q < end && *q >= '0' && *q <= '9')
            q++;
    *integer = 1;
    if (q < end && *q == '.') {
        *integer = 0;
        if (++q >= end || *q < '0' || *q > '9')
            return 0;
        while (q < end && *q >= '0' && *q <= '9')
            q++;
    }
    if (q < end && (*q == 'e' || *q == 'E')) {
        *integer = 0;
        if (++q < end && (*q == '+' || *q == '-'))
            q++;
        if (q >= end || *q < '0' || *q > '9')
            return 0;
        while (q < end && *q >= '0' && *q <= '9')
            q++;
    }
    *p = q;
    return 1;
}

/* The JSON number at *p, *p moved past it; *integer when it has no fraction or exponent, else
 * its value in *read (when not NULL). One that overflows a double is refused, as the Python
 * passes refuse it. */
static int number(cursor *p, cursor end, int *integer, double *read) {
    cursor start = *p;
    if (!number_text(p, end, integer))
        return 0;
    if (*integer)
        return 1;
    char buffer[64];
    if (*p - start >= (Py_ssize_t)sizeof buffer)
        return 0;
    memcpy(buffer, start, (size_t)(*p - start));
    buffer[*p - start] = '\0';
    double value = PyOS_string_to_double(buffer, NULL, NULL);
    if (value == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (read != NULL)
        *read = value;
    return !Py_IS_INFINITY(value);
}

/* Opens the object or array at *p (after blanks) when its first character is `bracket`. */
static int opens(cursor *p, cursor end, char bracket) {
    blank(p, end);
    if (*p >= end || **p != bracket)
        return 0;
    (*p)++;
    return 1;
}

/* The next item of an object or array being walked (*count: items so far, counted here): NEXT
 * with *p at it, END past the `close` bracket, or BAD. */
static int next_item(cursor *p, cursor end, Py_ssize_t *count, char close) {
    blank(p, end);
    if (*p < end && **p == close) {
        (*p)++;
        return END;
    }
    if ((*count)++ > 0) {
        if (*p >= end || **p != ',')
            return BAD;
        (*p)++;
        blank(p, end);
    }
    return NEXT;
}

/* The next member of an object being walked: NEXT with its key (an escaped key is BAD: given
 * up on) and *p at its value, END past the '}', or BAD. */
static int member(cursor *p, cursor end, Py_ssize_t *count, cursor *k, Py_ssize_t *k_size) {
    int escaped, walked = next_item(p, end, count, '}');
    if (walked != NEXT)
        return walked;
    if (!string(p, end, k, k_size, &escaped) || escaped)
        return BAD;
    blank(p, end);
    if (*p >= end || **p != ':')
        return BAD;
    (*p)++;
    blank(p, end);
    return NEXT;
}

/* Past the JSON value at *p, checked to be well-formed. */
static int skip_value(cursor *p, cursor end, int depth) {
    Py_ssize_t count = 0, size;
    cursor text;
    int walked, flag;
    blank(p, end);
    if (*p >= end || depth > JSON_DEPTH)
        return 0;
    switch (**p) {
    case '{':
        (*p)++;
        while ((walked = member(p, end, &count, &text, &size)) == NEXT)
            if (!skip_value(p, end, depth + 1))
                return 0;
        return walked == END;
    case '[':
        (*p)++;
        while ((walked = next_item(p, end, &count, ']')) == NEXT)
            if (!skip_value(p, end, depth + 1))
                return 0;
        return walked == END;
    case '"': return string(p, end, &text, &size, &flag);
    case 't': return WORD(p, end, "true");
    case 'f': return WORD(p, end, "false");
    case 'n': return WORD(p, end, "null");
    default: return number(p, end, &flag, NULL);
    }
}

/* A decimal of 1 to 18 digits (with a leading '-' when `sign`): up to 18, so it fits. */
static int decimal(cursor text, Py_ssize_t size, int sign, long long *value) {
    int negative = sign && size > 0 && *text == '-';
    text += negative, size -= negative;
    if (size < 1 || size > 18)
        return 0;
    long long result = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        if (text[i] < '0' || text[i] > '9')
            return 0;
        result = result * 10 + (text[i] - '0');
    }
    *value = negative ? -result : result;
    return 1;
}

/* A JSON string's text (checked by string()) with its escapes resolved, as a str. */
static PyObject *unescaped(cursor text, Py_ssize_t size) {
    unsigned char *out = PyMem_Malloc((size_t)size + 1), *o = out;
    if (out == NULL)
        return PyErr_NoMemory();
    cursor q = text, end = text + size;
    while (q < end) {
        if (*q != '\\') {
            *o++ = *q++;
            continue;
        }
        unsigned char c = q[1];
        q += 2;
        if (c != 'u') {
            *o++ = c == 'b' ? '\b' : c == 'f' ? '\f' : c == 'n' ? '\n' : c == 'r' ? '\r'
                 : c == 't' ? '\t' : c;
            continue;
        }
        uint32_t code = 0;
        for (int i = 0; i < 4; i++)
            code = code << 4 | (uint32_t)hex_digit(q[i]);
        q += 4;
        if (code >= 0xD800 && code <= 0xDBFF) {  /* (string() found its low half next) */
            code = 0x10000 + ((code - 0xD800) << 10) + (escaped_unit(q, end) - 0xDC00);
            q += 6;
        }
        if (code < 0x80) {
            *o++ = (unsigned char)code;
        } else if (code < 0x800) {
            *o++ = (unsigned char)(0xC0 | code >> 6);
            *o++ = (unsigned char)(0x80 | (code & 0x3F));
        } else if (code < 0x10000) {
            *o++ = (unsigned char)(0xE0 | code >> 12);
            *o++ = (unsigned char)(0x80 | (code >> 6 & 0x3F));
            *o++ = (unsigned char)(0x80 | (code & 0x3F));
        } else {
            *o++ = (unsigned char)(0xF0 | code >> 18);
            *o++ = (unsigned char)(0x80 | (code >> 12 & 0x3F));
            *o++ = (unsigned char)(0x80 | (code >> 6 & 0x3F));
            *o++ = (unsigned char)(0x80 | (code & 0x3F));
        }
    }
    PyObject *result = PyUnicode_DecodeUTF8((const char *)out, o - out, NULL);
    PyMem_Free(out);
    return result;
}

/* The JSON string at *p as a str; NULL with *gave_up set when it is none, or with a Python
 * error. */
static PyObject *json_str(cursor *p, cursor end, int *gave_up) {
    cursor text;
    Py_ssize_t size;
    int escaped;
    if (!string(p, end, &text, &size, &escaped)) {
        *gave_up = 1;
        return NULL;
    }
    return escaped ? unescaped(text, size)
                   : PyUnicode_DecodeUTF8((const char *)text, size, NULL);
}

/* The AnyValue at *p as rules see it, in *value (NULL when it holds none: null or {}) for a
 * string, int, bool or double; GIVE_UP for anything else; -1 with a Python error. */
static int json_any_value(cursor *p, cursor end, PyObject **value) {
    Py_ssize_t count = 0, k_size, size;
    cursor k, text;
    int walked, escaped, integer, gave_up = 0;
    long long whole;
    *value = NULL;
    blank(p, end);
    if (WORD(p, end, "null"))
        return DONE;
    if (!opens(p, end, '{'))
        return GIVE_UP;
    if ((walked = member(p, end, &count, &k, &k_size)) != NEXT)
        return walked == END ? DONE : GIVE_UP;
    cursor start = *p;
    if (*p >= end)
        return GIVE_UP;
    if (IS(k, k_size, "stringValue")) {
        if ((*value = json_str(p, end, &gave_up)) == NULL)
            return gave_up ? GIVE_UP : -1;
    } else if (IS(k, k_size, "boolValue")) {
        if (WORD(p, end, "true"))
            *value = Py_NewRef(Py_True);
        else if (WORD(p, end, "false"))
            *value = Py_NewRef(Py_False);
        else
            return GIVE_UP;
    } else if (IS(k, k_size, "intValue")) {
        if (**p == '"' ? !string(p, end, &text, &size, &escaped) || escaped ||
                         !decimal(text, size, 1, &whole)
                       : !number(p, end, &integer, NULL) || !integer ||
                         !decimal(start, *p - start, 1, &whole))
            return GIVE_UP;
        if ((*value = PyLong_FromLongLong(whole)) == NULL)
            return -1;
    } else if (IS(k, k_size, "doubleValue")) {
        double number_read;
        if (**p == '"') {
            if (!string(p, end, &text, &size, &escaped) || escaped)
                return GIVE_UP;
            if (IS(text, size, "NaN"))
                number_read = Py_NAN;
            else if (IS(text, size, "Infinity"))
                number_read = Py_HUGE_VAL;
            else if (IS(text, size, "-Infinity"))
                number_read = -Py_HUGE_VAL;
            else
                return GIVE_UP;
        } else if (!number(p, end, &integer, &number_read)) {
            return GIVE_UP;
        } else if (integer) {  /* an int made a float, as the Python passes do: -0 is 0.0 */
            if (!decimal(start, *p - start, 1, &whole))
                return GIVE_UP;
            number_read = (double)whole;
        }
        if ((*value = PyFloat_FromDouble(number_read)) == NULL)
            return -1;
    } else {
        return GIVE_UP;
    }
    if (member(p, end, &count, &k, &k_size) == END)
        return DONE;
    Py_CLEAR(*value);  /* a second member: refused by the Python passes */
    return GIVE_UP;
}

/* A KeyValue object at *p, *p moved past it: its key (a string without escapes) and where its
 * value starts (NULL when it has none); 0 when it is not such an object. */
static int key_value(cursor *p, cursor end, cursor *name, Py_ssize_t *name_size, cursor *value) {
    Py_ssize_t count = 0, k_size;
    cursor k;
    int walked, escaped;
    *name = *value = NULL;
    if (!opens(p, end, '{'))
        return 0;
    while ((walked = member(p, end, &count, &k, &k_size)) == NEXT) {
        if (IS(k, k_size, "key")) {
            if (*name != NULL || !string(p, end, name, name_size, &escaped) || escaped)
                return 0;
            continue;
        }
        if (IS(k, k_size, "value")) {
            if (*value != NULL)
                return 0;
            *value = *p;
        }
        if (!skip_value(p, end, 1))
            return 0;
    }
    return walked == END && *name != NULL;
}

/* The attributes array at *p: the values of `keys` (a tuple; None: every key) into *out (the
 * plan's shared empty dict when none). A null list is none. */
static int json_attributes(const plan *plan, cursor *p, cursor end, PyObject *keys,
                           PyObject **out) {
    PyObject *found = NULL;
    Py_ssize_t count = 0;
    int walked;
    blank(p, end);
    if (WORD(p, end, "null") || (keys != Py_None && PyTuple_GET_SIZE(keys) == 0 &&
                                 skip_value(p, end, 0))) {
        *out = Py_NewRef(plan->no_attributes);
        return DONE;
    }
    if (!opens(p, end, '['))
        return GIVE_UP;
    while ((walked = next_item(p, end, &count, ']')) == NEXT) {
        Py_ssize_t name_size;
        cursor name, value;
        if (!key_value(p, end, &name, &name_size, &value))
            goto give_up;
        PyObject *key;
        if (keys == Py_None) {
            if ((key = PyUnicode_DecodeUTF8((const char *)name, name_size, NULL)) == NULL)
                goto error;
        } else if ((key = wanted_key(keys, name, name_size)) != NULL) {
            Py_INCREF(key);
        } else {
            continue;
        }
        PyObject *decoded = NULL;
        int read = value == NULL ? DONE : json_any_value(&value, end, &decoded);
        if (read == DONE && decoded != NULL &&
                ((found == NULL && (found = PyDict_New()) == NULL) ||
                 PyDict_SetItem(found, key, decoded) < 0))
            read = -1;
        Py_DECREF(key);
        Py_XDECREF(decoded);
        if (read != DONE) {
            Py_XDECREF(found);
            return read;
        }
    }
    if (walked != END)
        goto give_up;
    *out = found != NULL ? found : Py_NewRef(plan->no_attributes);
    return DONE;
give_up:
    Py_XDECREF(found);
    return GIVE_UP;
error:
    Py_XDECREF(found);
    return -1;
}

/* A hex id of `size` bytes, either case, into `id`; 0 for anything else. */
static int json_id(cursor *p, cursor end, unsigned char *id, Py_ssize_t size) {
    cursor text;
    Py_ssize_t length;
    int escaped;
    if (!string(p, end, &text, &length, &escaped) || escaped || length != 2 * size)
        return 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        int high = hex_digit(text[2 * i]), low = hex_digit(text[2 * i + 1]);
        if (high < 0 || low < 0)
            return 0;
        id[i] = (unsigned char)(high << 4 | low);
    }
    return 1;
}

/* A time (a fixed64): a decimal string or a JSON integer that fits, or null for 0. */
static int json_time(cursor *p, cursor end, uint64_t *value) {
    cursor text = *p;
    Py_ssize_t size;
    int escaped, integer;
    if (WORD(p, end, "null")) {
        *value = 0;
        return 1;
    }
    if (*p < end && **p == '"') {
        if (!string(p, end, &text, &size, &escaped) || escaped)
            return 0;
    } else {
        if (!number(p, end, &integer, NULL) || !integer)
            return 0;
        size = *p - text;
    }
    if (size < 1 || size > 20)
        return 0;
    uint64_t result = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        unsigned digit = (unsigned)(text[i] - '0');
        if (digit > 9 || result > (UINT64_MAX - digit) / 10)
            return 0;
        result = result * 10 + digit;
    }
    *value = result;
    return 1;
}

/* An enum's number (0 to count - 1) or its name (prefix + names[i]); -1 for anything else. */
static int json_enum(cursor *p, cursor end, PyObject *names, const char *prefix) {
    Py_ssize_t count = PyTuple_GET_SIZE(names), size, prefix_size = (Py_ssize_t)strlen(prefix);
    cursor text = *p;
    int escaped, integer;
    if (*p >= end)
        return -1;
    if (**p != '"') {
        long long value;
        if (!number(p, end, &integer, NULL) || !integer || !decimal(text, *p - text, 0, &value) ||
                value >= count)
            return -1;
        return (int)value;
    }
    if (!string(p, end, &text, &size, &escaped) || escaped || size <= prefix_size ||
            memcmp(text, prefix, (size_t)prefix_size) != 0)
        return -1;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t name_size;
        const char *name = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(names, i), &name_size);
        if (name == NULL) {
            PyErr_Clear();
            return -1;
        }
        if (name_size == size - prefix_size && memcmp(name, text + prefix_size, name_size) == 0)
            return (int)i;
    }
    return -1;
}

/* A span's status object: its code as a number; -1 for anything else. */
static int json_status(cursor *p, cursor end, PyObject *statuses) {
    Py_ssize_t count = 0, k_size;
    cursor k;
    int walked, code = 0, seen = 0;
    if (!opens(p, end, '{'))
        return -1;
    while ((walked = member(p, end, &count, &k, &k_size)) == NEXT) {
        if (IS(k, k_size, "code")) {
            if (seen++ || (code = json_enum(p, end, statuses, "STATUS_CODE_")) < 0)
                return -1;
        } else if (!skip_value(p, end, 1)) {
            return -1;
        }
    }
    return walked == END ? code : -1;
}

/* Per request: where spans go, and the JSON-only parts of the plan. */
typedef struct {
    sink s;
    PyObject *group_key;  /* the --group-by resource key (str), or None */
    PyObject *own_keys;   /* the attributes read on BeTrace's own spans (checked, not kept) */
    Py_ssize_t received;
} json_sink;

/* Known members of a span, as bits: each may appear once. */
enum { TRACE_ID = 1, SPAN_ID = 2, PARENT = 4, NAME = 8, KIND = 16, START = 32, END_TIME = 64,
       STATUS = 128, ATTRIBUTES = 256 };

/* The selection of a span's name (a new reference, once) and the attribute keys it reads
 * (borrowed: None for every one; NULL when not selected). -1 with a Python error. */
static int resolve(const plan *plan, const json_sink *j, cursor name, Py_ssize_t size,
                   PyObject **selection, PyObject **keys) {
    if (*selection != NULL)
        return 0;
    if ((*selection = selection_of(plan, name, size)) == NULL || check_selection(*selection) < 0)
        return -1;
    *keys = *selection == Py_None ? NULL : *selection == plan->own ? j->own_keys
                                         : PyTuple_GET_ITEM(*selection, 1);
    return 0;
}

static int reads_attributes(PyObject *keys) {
    return keys == Py_None || PyTuple_GET_SIZE(keys) > 0;
}

/* One span: not selected (its name read, nothing else), or checked as the Python passes check it
 * and BeTrace's own (counted) or added to the batch. */
static int json_span(const plan *plan, json_sink *j, cursor *p, cursor end) {
    unsigned char trace_id[16], span_id[8], parent[8];
    cursor k, name = (cursor)"", attributes = NULL;
    Py_ssize_t count = 0, k_size, name_size = 0;
    uint64_t start = 0, stop = 0;
    int walked, escaped, seen = 0, valid = 0, kind = 0, code = 0, has_parent = 0, result = GIVE_UP;
    PyObject *selection = NULL, *keys = NULL, *found = NULL;
    if (!opens(p, end, '{'))
        return GIVE_UP;
    while ((walked = member(p, end, &count, &k, &k_size)) == NEXT) {
        int bit = IS(k, k_size, "traceId") ? TRACE_ID : IS(k, k_size, "spanId") ? SPAN_ID
                : IS(k, k_size, "parentSpanId") ? PARENT : IS(k, k_size, "name") ? NAME
                : IS(k, k_size, "kind") ? KIND : IS(k, k_size, "startTimeUnixNano") ? START
                : IS(k, k_size, "endTimeUnixNano") ? END_TIME : IS(k, k_size, "status") ? STATUS
                : IS(k, k_size, "attributes") ? ATTRIBUTES : 0;
        if (bit & seen)
            goto done;
        seen |= bit;
        cursor value = *p;
        int ok = 1;
        switch (bit) {
        case TRACE_ID: ok = json_id(p, end, trace_id, 16); break;
        case SPAN_ID: ok = json_id(p, end, span_id, 8); break;
        case PARENT:
            if (WORD(p, end, "null") || WORD(p, end, "\"\""))
                break;
            ok = json_id(p, end, parent, 8);
            has_parent = ok && !zero(parent, 8);
            break;
        case NAME:
            if (!string(p, end, &name, &name_size, &escaped) || escaped)
                goto done;  /* (a name that is no string makes the span refused) */
            break;
        case KIND: ok = (kind = json_enum(p, end, plan->kinds, "SPAN_KIND_")) >= 0; break;
        case START: ok = json_time(p, end, &start); break;
        case END_TIME: ok = json_time(p, end, &stop); break;
        case STATUS: ok = (code = json_status(p, end, plan->statuses)) >= 0; break;
        case ATTRIBUTES:  /* read here when the name came first (as exporters write it) */
            ok = 0;
            if (!(seen & NAME)) {
                attributes = value;
            } else if (resolve(plan, j, name, name_size, &selection, &keys) < 0) {
                result = -1;
                goto done;
            } else if (selection != Py_None && reads_attributes(keys)) {
                if ((result = json_attributes(plan, p, end, keys, &found)) != DONE)
                    goto done;
                result = GIVE_UP;
                ok = 1;
            }
            break;
        default: ok = 0;
        }
        if (ok) {
            valid |= bit;
        } else {
            *p = value;
            if (!skip_value(p, end, 1))
                goto done;
        }
    }
    if (walked != END)
        goto done;
    j->received++;
    if (resolve(plan, j, name, name_size, &selection, &keys) < 0) {
        result = -1;
        goto done;
    }
    if (selection == Py_None) {
        result = DONE;
        goto done;
    }
    /* what the Python passes refuse: gave up on (ids absent or zero, bad times, kind, status) */
    int needed = TRACE_ID | SPAN_ID | (seen & (PARENT | KIND | START | END_TIME | STATUS));
    if ((valid & needed) != needed || zero(trace_id, 16) || zero(span_id, 8))
        goto done;
    if (found == NULL) {
        if (attributes == NULL || !reads_attributes(keys))
            found = Py_NewRef(plan->no_attributes);
        else if ((result = json_attributes(plan, &attributes, end, keys, &found)) != DONE)
            goto done;
    }
    result = DONE;
    if (selection == plan->own) {
        j->s.own++;
        goto done;
    }
    if (start < plan->since || start > plan->last)
        goto done;
    PyObject *hex_id = NULL, *spans = bucket(&j->s, trace_id, &hex_id);
    PyObject *span_hex = hex(span_id, 8);
    PyObject *parent_hex = has_parent ? hex(parent, 8) : PyUnicode_New(0, 0);
    PyObject *start_ns = PyLong_FromUnsignedLongLong(start);
    PyObject *end_ns = PyLong_FromUnsignedLongLong(stop);
    if (spans == NULL || span_hex == NULL || parent_hex == NULL || start_ns == NULL ||
            end_ns == NULL) {
        result = -1;
    } else {
        PyObject *values[SLOTS] = {hex_id, span_hex, PyTuple_GET_ITEM(selection, 0), parent_hex,
                                   start_ns, end_ns, PyTuple_GET_ITEM(plan->statuses, code),
                                   PyTuple_GET_ITEM(plan->kinds, kind), j->s.service,
                                   j->s.version, found, j->s.group};
        PyObject *span = make_span(plan, values);
        result = span == NULL ? -1 : PyList_Append(spans, span) < 0 ? -1 : DONE;
        Py_XDECREF(span);
    }
    Py_XDECREF(span_hex);
    Py_XDECREF(parent_hex);
    Py_XDECREF(start_ns);
    Py_XDECREF(end_ns);
done:
    Py_XDECREF(selection);
    Py_XDECREF(found);
    return result;
}

/* An array of spans, or of scopes (each an object whose "spans" is such an array). */
static int json_spans(const plan *plan, json_sink *j, cursor *p, cursor end, int scopes) {
    Py_ssize_t count = 0;
    int walked, result;
    if (!opens(p, end, '['))
        return GIVE_UP;
    while ((walked = next_item(p, end, &count, ']')) == NEXT) {
        if (!scopes) {
            if ((result = json_span(plan, j, p, end)) != DONE)
                return result;
            continue;
        }
        Py_ssize_t members = 0, k_size;
        cursor k;
        int seen = 0;
        if (!opens(p, end, '{'))
            return GIVE_UP;
        while ((walked = member(p, end, &members, &k, &k_size)) == NEXT) {
            if (!IS(k, k_size, "spans")) {
                if (!skip_value(p, end, 1))
                    return GIVE_UP;
            } else if (seen++ || (result = json_spans(plan, j, p, end, 0)) != DONE) {
                return seen > 1 ? GIVE_UP : result;
            }
        }
        if (walked != END)
            return GIVE_UP;
    }
    return walked == END ? DONE : GIVE_UP;
}

/* A resource: its service.name and service.version (each None unless a string) and the group
 * key's value into the sink (new references). */
static int json_resource(json_sink *j, cursor *p, cursor end) {
    Py_ssize_t count = 0, k_size;
    cursor k;
    int walked, seen = 0;
    Py_ssize_t group_size = 0;
    const char *group = NULL;
    if (j->group_key != Py_None &&
            (group = PyUnicode_AsUTF8AndSize(j->group_key, &group_size)) == NULL)
        return -1;
    if (!opens(p, end, '{'))
        return GIVE_UP;
    while ((walked = member(p, end, &count, &k, &k_size)) == NEXT) {
        if (!IS(k, k_size, "attributes")) {
            if (!skip_value(p, end, 1))
                return GIVE_UP;
            continue;
        }
        Py_ssize_t items = 0;
        if (seen++ || !opens(p, end, '['))
            return GIVE_UP;
        while ((walked = next_item(p, end, &items, ']')) == NEXT) {
            Py_ssize_t name_size;
            cursor name, value;
            if (!key_value(p, end, &name, &name_size, &value))
                return GIVE_UP;
            int is_service = IS(name, name_size, "service.name");
            int is_version = IS(name, name_size, "service.version");
            int is_group = group != NULL && name_size == group_size &&
                           memcmp(name, group, (size_t)name_size) == 0;
            if (!is_service && !is_version && !is_group)
                continue;
            PyObject *decoded = NULL;
            int read = value == NULL ? DONE : json_any_value(&value, end, &decoded);
            if (read != DONE)
                return read;
            if (decoded == NULL)
                continue;  /* no value: the attribute is not there */
            int text = PyUnicode_CheckExact(decoded);
            if (is_service)
                Py_XSETREF(j->s.service, Py_NewRef(text ? decoded : Py_None));
            if (is_version)
                Py_XSETREF(j->s.version, Py_NewRef(text ? decoded : Py_None));
            if (is_group)
                Py_XSETREF(j->s.group, Py_NewRef(decoded));
            Py_DECREF(decoded);
        }
        if (walked != END)
            return GIVE_UP;
    }
    return walked == END ? DONE : GIVE_UP;
}

/* One ResourceSpans: its resource, then its scopes (a resource after them is given up on). */
static int json_resource_spans(const plan *plan, json_sink *j, cursor *p, cursor end) {
    Py_ssize_t count = 0, k_size;
    cursor k;
    int walked, result, seen = 0;
    Py_XSETREF(j->s.service, Py_NewRef(Py_None));
    Py_XSETREF(j->s.version, Py_NewRef(Py_None));
    Py_XSETREF(j->s.group, Py_NewRef(Py_None));
    j->s.last_bucket = NULL;
    if (!opens(p, end, '{'))
        return GIVE_UP;
    while ((walked = member(p, end, &count, &k, &k_size)) == NEXT) {
        int bit = IS(k, k_size, "resource") ? 1 : IS(k, k_size, "scopeSpans") ? 2
                : IS(k, k_size, "instrumentationLibrarySpans") ? 4 : 0;
        if ((bit & seen) || (bit == 1 && seen) || (bit & 6 && seen & 6))
            return GIVE_UP;
        seen |= bit;
        if (bit == 1)
            result = json_resource(j, p, end);
        else if (bit)
            result = WORD(p, end, "null") ? DONE : json_spans(plan, j, p, end, 1);
        else
            result = skip_value(p, end, 1);
        if (result != DONE)
            return result;
    }
    return walked == END ? DONE : GIVE_UP;
}

PyDoc_STRVAR(decode_json_doc,
"decode_json(data: bytes, plan: tuple, group_key: str | None, own_keys: tuple | None,\n"
"            batch: dict, hex_ids: dict) -> tuple[int, int] | None\n\n"
"Decode an OTLP JSON ExportTraceServiceRequest as `plan` says (decode_scope's plan): each\n"
"selected span appended to batch[its hex trace id], carrying its resource's service, version\n"
"and `group_key` attribute; BeTrace's own spans checked with `own_keys` and counted. Returns\n"
"(spans received, own spans), or None when the request is not in the common shape this\n"
"decodes (then `batch` holds nothing to use): the Python passes decode it.");

static PyObject *decode_json(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    plan plan;
    json_sink j = {0};
    if (nargs != 6 || !PyBytes_Check(args[0]) || !PyTuple_Check(args[1]) ||
            (args[2] != Py_None && !PyUnicode_Check(args[2])) ||
            (args[3] != Py_None && !PyTuple_Check(args[3])) || !PyDict_CheckExact(args[4]) ||
            !PyDict_CheckExact(args[5])) {
        PyErr_SetString(PyExc_TypeError, "decode_json(bytes, tuple, str | None, tuple | None, "
                                         "dict, dict)");
        return NULL;
    }
    if (parse_plan(args[1], &plan) < 0)
        return NULL;
    j.group_key = args[2];
    j.own_keys = args[3];
    j.s.batch = args[4];
    j.s.hex_ids = args[5];
    cursor p = (cursor)PyBytes_AS_STRING(args[0]), end = p + PyBytes_GET_SIZE(args[0]), k;
    Py_ssize_t count = 0, k_size;
    int walked = BAD, result = GIVE_UP, seen = 0;
    if (opens(&p, end, '{')) {
        while ((walked = member(&p, end, &count, &k, &k_size)) == NEXT) {
            int bit = IS(k, k_size, "resourceSpans") ? 1 : IS(k, k_size, "batches") ? 2 : 0;
            if (seen & (bit ? 3 : 0))
                break;
            seen |= bit;
            Py_ssize_t items = 0;
            if (!bit) {
                if ((result = skip_value(&p, end, 1)) != DONE)
                    break;
                continue;
            }
            result = opens(&p, end, '[') ? DONE : GIVE_UP;
            while (result == DONE && (walked = next_item(&p, end, &items, ']')) == NEXT)
                result = json_resource_spans(&plan, &j, &p, end);
            if (result == DONE && walked != END)
                result = GIVE_UP;
            if (result != DONE)
                break;
        }
        blank(&p, end);
        if (result == DONE && (walked != END || !seen || p != end))
            result = GIVE_UP;
    }
    Py_XDECREF(j.s.service);
    Py_XDECREF(j.s.version);
    Py_XDECREF(j.s.group);
    if (result < 0)
        return NULL;
    if (result == GIVE_UP)
        Py_RETURN_NONE;
    return Py_BuildValue("(nn)", j.received, j.s.own);
}

static PyMethodDef methods[] = {
    {"decode_scope", (PyCFunction)(void (*)(void))decode_scope, METH_FASTCALL, decode_scope_doc},
    {"decode_json", (PyCFunction)(void (*)(void))decode_json, METH_FASTCALL, decode_json_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wire",
    "OTLP spans decoded in C, from the protobuf wire format and from JSON, for sidecar.otlp.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__wire(void) {
    return PyModule_Create(&module);
}
