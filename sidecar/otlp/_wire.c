/* The spans of one serialized OTLP ScopeSpans decoded in C, straight from the protobuf wire format:
 * a span no rule selects costs a walk over its field headers; a selected one becomes a `Span`
 * holding only the attributes its rules read. The wire format is read as upb reads it (the last
 * of a repeated singular field wins, a field of an unexpected wire type is skipped as unknown,
 * groups are skipped), so a span it decodes is refused where upb would refuse it (a span no rule
 * selects is only framed, never checked further). See sidecar/otlp/protobuf.py, the one caller,
 * which builds the plan. */

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
    cursor last_id;
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
    s->last_id = id;
    s->last_bucket = spans;
    s->last_hex = *hex_id = shared;
    return spans;
}

/* One span: refused (in s->invalid), not selected, BeTrace's own, or added to the batch.
 * -1 with a Python error. */
static int decode_span(const plan *plan, sink *s, cursor p, cursor end) {
    fields f;
    if (!span_fields(p, end, &f))
        return refuse(s->invalid, PyUnicode_FromFormat("invalid span (%zd bytes): %s",
                                                        (Py_ssize_t)(end - p), CORRUPT));
    PyObject *name = PyBytes_FromStringAndSize((const char *)f.name, f.name_size);
    if (name == NULL)
        return -1;
    PyObject *selection = PyDict_GetItemWithError(plan->reads, name);  /* borrowed */
    if (selection != NULL) {
        Py_INCREF(selection);
    } else if (PyErr_Occurred()) {
        Py_DECREF(name);
        return -1;
    } else if (plan->classify == Py_None) {
        selection = Py_NewRef(Py_None);
    } else {
        selection = PyObject_CallOneArg(plan->classify, name);
        if (selection == NULL) {
            Py_DECREF(name);
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
                return -1;
            PyErr_Clear();
            return refuse(s->invalid, PyUnicode_FromFormat("invalid span (%zd bytes): %s",
                                                            (Py_ssize_t)(end - p), BAD_UTF8));
        }
    }
    Py_DECREF(name);
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
    if (!PyTuple_CheckExact(selection) || PyTuple_GET_SIZE(selection) != 2 ||
            (PyTuple_GET_ITEM(selection, 1) != Py_None &&
             !PyTuple_CheckExact(PyTuple_GET_ITEM(selection, 1)))) {
        PyErr_SetString(PyExc_TypeError, "decode_scope: a selection is None, the plan's own or "
                                         "(name, keys: tuple | None)");
        result = -1;
        goto done;
    }
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
    if (!PyArg_ParseTuple(plan_args, "O!OOO!O!O!O!OOO!KK:decode_scope plan",
                          &PyDict_Type, &plan.reads, &plan.classify, &plan.own,
                          &PyType_Type, &plan.span_type, &PyTuple_Type, &plan.slots,
                          &PyTuple_Type, &plan.kinds, &PyTuple_Type, &plan.statuses,
                          &plan.any_value, &plan.status_of, &PyDict_Type, &plan.no_attributes,
                          &plan.since, &plan.last))
        return NULL;
    if (PyTuple_GET_SIZE(plan.slots) != SLOTS || PyTuple_GET_SIZE(plan.kinds) != 6 ||
            PyTuple_GET_SIZE(plan.statuses) != 3) {
        PyErr_SetString(PyExc_ValueError, "decode_scope: a plan of the wrong shape");
        return NULL;
    }
    for (int i = 0; i < SLOTS; i++) {
        if (Py_TYPE(PyTuple_GET_ITEM(plan.slots, i))->tp_descr_set == NULL) {
            PyErr_SetString(PyExc_TypeError, "decode_scope: the plan's slots must be descriptors");
            return NULL;
        }
    }
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

static PyMethodDef methods[] = {
    {"decode_scope", (PyCFunction)(void (*)(void))decode_scope, METH_FASTCALL, decode_scope_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wire",
    "OTLP protobuf spans decoded from the wire format in C, for sidecar.otlp.protobuf.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__wire(void) {
    return PyModule_Create(&module);
}
