/* Replay's held and spilled traces packed into bytes and unpacked straight into `Span`s, in C:
 * what marshal did with a tuple per span, at about half the cost (tuples made, marshalled, loaded
 * and made into spans again: 3.1 us per span, against 1.7-1.9). A `Packer` takes the decoders'
 * batches as they come and keeps them packed, already in their partitions (a held span costs its
 * packed bytes, not a Python object); `unpack` merges a partition's chunks by trace id.
 *
 * A chunk: the strings its spans share (names, statuses, kinds, services, versions, attribute
 * keys, --group-by values), each once, in a table at its head; then its trace entries. An entry
 * is the trace id, what the Packer found of the trace's spans there (WANTED: a rule may apply to
 * the trace, by the rules' scope tests, or it cannot tell; INSIDE: a span starts in the window),
 * the entry's length, and the spans: the values a rule reads as they are (None, bool, int,
 * float, str, shared strs by their index) and anything else through marshal. So `judge` finds
 * a partition's traces by their entries' heads (the ids' bytes, in a hash table), reads only the
 * wanted traces' spans, where they lie, and tells by the rules as data (sidecar.dsl's PlainRule)
 * the traces no rule fires on, in three-valued logic like the scope tests (what it cannot tell
 * is left to Python's `evaluate`); `unpack` makes only the rest. See
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

/* Each value starts with its tag; a shared str (SEEN) is its index in the chunk's table. */
enum { NONE = 'N', TRUE = 'T', FALSE = 'F', INT = 'i', FLOAT = 'd', TEXT = 's', SEEN = 'r',
       MARSHAL = 'm', EMPTY = 'e', DICT = 'a' };
enum { WANTED = 1, INSIDE = 2 };  /* an entry's flags */
#define ENTRY_LENGTH 4  /* bytes of an entry's length, little-endian */

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

static int grow(void **array, Py_ssize_t *room, Py_ssize_t needed, size_t item) {
    if (needed <= *room)
        return 0;
    Py_ssize_t more = needed > 2 * *room ? needed : 2 * *room;
    void *grown = PyMem_Realloc(*array, (size_t)more * item);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *array = grown;
    *room = more;
    return 0;
}

static int room(writer *w, Py_ssize_t more) {
    return grow((void **)&w->data, &w->capacity, w->size + more, 1);
}

static int put(writer *w, const void *bytes, Py_ssize_t size) {
    if (room(w, size) < 0)
        return -1;
    memcpy(w->data + w->size, bytes, (size_t)size);
    w->size += size;
    return 0;
}

static int put_tag(writer *w, char tag) {
    if (room(w, 1) < 0)
        return -1;
    w->data[w->size++] = tag;
    return 0;
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

/* A value as it is packed (and as the scope tests see it): its tag and what it holds. */
typedef struct {
    char tag;  /* NONE, TRUE, FALSE, INT, FLOAT, TEXT, MARSHAL (anything else) */
    long long integer;
    double number;
    const char *text;  /* (the str's own UTF-8, or the packed bytes) */
    Py_ssize_t size;
    PyObject *shared;  /* read from a chunk's table of shared strs: that str (borrowed) */
} view;

static void view_of(PyObject *value, view *v) {
    v->tag = MARSHAL;
    v->shared = NULL;
    if (value == Py_None || value == Py_True || value == Py_False) {
        v->tag = value == Py_None ? NONE : value == Py_True ? TRUE : FALSE;
    } else if (PyLong_CheckExact(value)) {
        int overflow;
        v->integer = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (!overflow)
            v->tag = INT;
    } else if (PyFloat_CheckExact(value)) {
        v->tag = FLOAT;
        v->number = PyFloat_AS_DOUBLE(value);
    } else if (PyUnicode_CheckExact(value)) {
        v->text = PyUnicode_AsUTF8AndSize(value, &v->size);
        if (v->text != NULL)
            v->tag = TEXT;
    }
    PyErr_Clear();  /* (what could not be read stays MARSHAL: "maybe") */
}

/* A value as `view_of` saw it (not shared). */
static int put_view(writer *w, PyObject *value, const view *v) {
    switch (v->tag) {
    case NONE: case TRUE: case FALSE:
        return put_tag(w, v->tag);
    case INT: case FLOAT:
        if (room(w, 9) < 0)
            return -1;
        w->data[w->size] = v->tag;
        memcpy(w->data + w->size + 1, v->tag == INT ? (void *)&v->integer : (void *)&v->number, 8);
        w->size += 9;
        return 0;
    case TEXT:
        return put_tag(w, TEXT) < 0 || put_size(w, (uint64_t)v->size) < 0
                   ? -1 : put(w, v->text, v->size);
    }
    /* MARSHAL: an int past 64 bits, a lone surrogate, a tuple, bytes, ... */
    PyObject *marshalled = PyMarshal_WriteObjectToString(value, Py_MARSHAL_VERSION);
    if (marshalled == NULL)
        return -1;
    int failed = put_tag(w, MARSHAL) < 0 ||
                 put_size(w, (uint64_t)PyBytes_GET_SIZE(marshalled)) < 0 ||
                 put(w, PyBytes_AS_STRING(marshalled), PyBytes_GET_SIZE(marshalled)) < 0;
    Py_DECREF(marshalled);
    return failed ? -1 : 0;
}

/* One value; a str that `shared` says recurs is written once and referred to after. */
static int put_value(writer *w, PyObject *value, int shared) {
    shared = shared && PyUnicode_CheckExact(value);
    size_t at = ((uintptr_t)value >> 4) % RECENT;
    if (shared) {
        if (w->recent[at] == value)
            return put_seen(w, at, value, w->recent_index[at]);
        PyObject *index = PyDict_GetItemWithError(w->seen, value);
        if (index != NULL)
            return put_seen(w, at, value, PyLong_AsSsize_t(index));
        if (PyErr_Occurred())
            return -1;
    }
    view v;
    view_of(value, &v);
    if (shared && v.tag == TEXT) {  /* new to the table */
        Py_ssize_t number = PyDict_GET_SIZE(w->seen);
        PyObject *index = PyLong_FromSsize_t(number);
        int failed = index == NULL || PyDict_SetItem(w->seen, value, index) < 0;
        Py_XDECREF(index);
        return failed ? -1 : put_seen(w, at, value, number);
    }
    return put_view(w, value, &v);
}

/* --- which traces a rule may apply to ----------------------------------------------------- */

/* A span's attributes as views: count < 0 when they are not a dict of str keys. */
typedef struct {
    Py_ssize_t count;
    PyObject **keys;  /* (borrowed) */
    view *values;
} span_attributes;

/* A dict's attributes as views, in place for a few. */
#define FEW 16
typedef struct {
    span_attributes seen;
    PyObject *few_keys[FEW];
    view few_values[FEW];
} attribute_views;

/* A span's attributes, packed, and as the scope tests see them in `a` (free_views after). */
static int put_attributes(writer *w, PyObject *attributes, attribute_views *a) {
    a->seen.count = -1;
    a->seen.keys = a->few_keys;
    a->seen.values = a->few_values;
    if (!PyDict_CheckExact(attributes))
        return put_value(w, attributes, 0);
    Py_ssize_t count = PyDict_GET_SIZE(attributes), at = 0, i = 0;
    if (count == 0) {
        a->seen.count = 0;
        return put_tag(w, EMPTY);
    }
    if (count > FEW) {
        a->seen.keys = PyMem_Malloc((size_t)count * sizeof(PyObject *));
        a->seen.values = PyMem_Malloc((size_t)count * sizeof(view));
        if (a->seen.keys == NULL || a->seen.values == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    if (put_tag(w, DICT) < 0 || put_size(w, (uint64_t)count) < 0)
        return -1;
    int strings = 1;
    PyObject *key, *value;
    while (PyDict_Next(attributes, &at, &key, &value)) {
        view *v = &a->seen.values[i];
        view_of(value, v);
        if (put_value(w, key, 1) < 0 || put_view(w, value, v) < 0)
            return -1;
        strings &= PyUnicode_CheckExact(key);
        a->seen.keys[i++] = key;
    }
    a->seen.count = strings ? i : -1;
    return 0;
}

static void free_views(attribute_views *a) {
    if (a->seen.keys != a->few_keys)
        PyMem_Free(a->seen.keys);
    if (a->seen.values != a->few_values)
        PyMem_Free(a->seen.values);
    a->seen.keys = a->few_keys;
    a->seen.values = a->few_values;
}

enum { NO = 0, YES = 1, MAYBE = 2 };
/* PlainTest's and PlainExpr's kinds, PlainRule's forms and PLAIN_OPS, in sidecar/dsl/compiler.py */
enum { T_UNKNOWN, T_COMPARE, T_BARE, T_NOT, T_AND, T_OR, T_COMPARE_THIS, T_EXISTS };
enum { R_CONDITION, R_FOR_EACH, R_WHEN };
enum { EQ, NE, LT, LE, GT, GE };

static int same_str(PyObject *a, PyObject *b) {  /* (both exact strs) */
    return a == b || (PyUnicode_GET_LENGTH(a) == PyUnicode_GET_LENGTH(b) &&
                      PyUnicode_Compare(a, b) == 0);
}

static const view *attribute(const span_attributes *a, PyObject *key) {
    for (Py_ssize_t i = 0; i < a->count; i++)
        if (same_str(a->keys[i], key))
            return &a->values[i];
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

/* `value op other` as sidecar.dsl's _compare has it against a literal, and _compare_this against
 * the checked span's value, for values that are there: equal only str with str, bool with bool
 * and number with number; ordered only str with str (by code point) and number with number. */
static int compare(const view *v, int op, const view *other) {
    if (v->tag == MARSHAL || other->tag == MARSHAL)
        return MAYBE;  /* (a big int, a tuple, ...) */
    if (v->tag == TEXT && other->tag == TEXT) {
        int sign = memcmp(v->text, other->text,
                          (size_t)(v->size < other->size ? v->size : other->size));
        sign = sign != 0 ? sign : (v->size > other->size) - (v->size < other->size);
        return ordered(op, sign);  /* (UTF-8 orders as code points do) */
    }
    int numbers = (v->tag == INT || v->tag == FLOAT) && (other->tag == INT || other->tag == FLOAT);
    if (!numbers) {  /* (bools are equal to themselves, and have no order) */
        int equal = (v->tag == TRUE || v->tag == FALSE) && v->tag == other->tag;
        return op == EQ ? equal : op == NE ? !equal : NO;
    }
    if (v->tag == INT && other->tag == INT)
        return ordered(op, (v->integer > other->integer) - (v->integer < other->integer));
    const view *whole = v->tag == INT ? v : other->tag == INT ? other : NULL;
    if (whole != NULL && (whole->integer > (1LL << 53) || whole->integer < -(1LL << 53)))
        return MAYBE;  /* (not exact as a double) */
    double value = v->tag == INT ? (double)v->integer : v->number;
    double number = other->tag == INT ? (double)other->integer : other->number;
    switch (op) {  /* (NaN: false but for !=) */
    case EQ: return value == number;
    case NE: return value != number;
    case LT: return value < number;
    case LE: return value <= number;
    case GT: return value > number;
    default: return value >= number;
    }
}

/* A small int, or -1. */
static long number_in(PyObject *value) {
    long number = PyLong_Check(value) ? PyLong_AsLong(value) : -1;
    if (number == -1)
        PyErr_Clear();
    return number;
}

typedef int (*tester)(PyObject *test, const void *on, const span_attributes *this);

/* NOT, AND or OR (`kind`) of `test`'s parts, each by `part`, three-valued; -1 for other kinds. */
static int logic(PyObject *test, long kind, tester part, const void *on,
                 const span_attributes *this) {
    Py_ssize_t size = PyTuple_GET_SIZE(test);
    if (kind == T_NOT && size == 2) {
        int inner = part(PyTuple_GET_ITEM(test, 1), on, this);
        return inner == MAYBE ? MAYBE : !inner;
    }
    if (kind != T_AND && kind != T_OR)
        return -1;
    int result = kind == T_AND ? YES : NO;
    for (Py_ssize_t i = 1; i < size; i++) {
        int found = part(PyTuple_GET_ITEM(test, i), on, this);
        if (found == (kind == T_AND ? NO : YES))
            return found;
        if (found == MAYBE)
            result = MAYBE;
    }
    return result;
}

/* A PlainTest on a span's attributes (`on`), with `this` those of the span a for_each rule
 * checks (NULL outside one): NO, YES or MAYBE (what it cannot tell). */
static int test_span(PyObject *test, const void *on, const span_attributes *this) {
    const span_attributes *a = on;
    if (!PyTuple_Check(test) || PyTuple_GET_SIZE(test) < 1)
        return MAYBE;
    long kind = number_in(PyTuple_GET_ITEM(test, 0));
    Py_ssize_t size = PyTuple_GET_SIZE(test);
    int combined = logic(test, kind, test_span, on, this);
    if (combined >= 0)
        return combined;
    if (a->count < 0 || (kind != T_COMPARE && kind != T_BARE && kind != T_COMPARE_THIS) ||
            size < 2 || !PyUnicode_CheckExact(PyTuple_GET_ITEM(test, 1)))
        return MAYBE;
    const view *value = attribute(a, PyTuple_GET_ITEM(test, 1));
    if (kind == T_BARE)
        return size != 2 ? MAYBE : value != NULL && value->tag == TRUE;  /* (only True) */
    long op = size == 4 ? number_in(PyTuple_GET_ITEM(test, 2)) : -1;
    if (op < EQ || op > GE)
        return MAYBE;
    PyObject *other = PyTuple_GET_ITEM(test, 3);
    view literal;
    const view *against = &literal;
    if (kind == T_COMPARE) {
        view_of(other, &literal);
    } else {
        if (this == NULL || this->count < 0 || !PyUnicode_CheckExact(other))
            return MAYBE;
        against = attribute(this, other);
    }
    return value == NULL || against == NULL ? NO : compare(value, (int)op, against);
}

/* Whether a rule may apply where a span named `name` with attributes `a` is, by `tests` (span
 * name -> a tuple of PlainTest, or None for any span of the name): NO or MAYBE; -1 with an error. */
static int may_apply(PyObject *tests, PyObject *name, const span_attributes *a) {
    if (!PyUnicode_CheckExact(name))
        return MAYBE;
    PyObject *found = PyDict_GetItemWithError(tests, name);
    if (found == NULL)
        return PyErr_Occurred() ? -1 : NO;
    if (!PyTuple_Check(found))
        return MAYBE;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(found); i++)
        if (PyTuple_GET_ITEM(found, i) == Py_None)
            return MAYBE;  /* any span of the name will do */
    int verdict = NO;
    for (Py_ssize_t i = 0; verdict == NO && i < PyTuple_GET_SIZE(found); i++)
        verdict = test_span(PyTuple_GET_ITEM(found, i), a, NULL) == NO ? NO : MAYBE;
    return verdict;
}

/* What a Packer judges spans by: the rules' scope tests (NULL: none, every trace is wanted) and
 * the window [since, until) (bounded: there is one; endless: until is 2**64 or beyond). */
typedef struct {
    PyObject *tests;
    int bounded, endless;
    unsigned long long since, until;
} scope;

/* A span's WANTED and INSIDE flags added to *flags, from its name, start and attributes. */
static int judge_span(const scope *sc, PyObject *values[SLOTS], const span_attributes *a,
                      int *flags) {
    unsigned long long start = 0;
    int readable = PyLong_CheckExact(values[4]);
    if (readable && (start = PyLong_AsUnsignedLongLong(values[4])) == (unsigned long long)-1 &&
            PyErr_Occurred()) {
        PyErr_Clear();
        readable = 0;
    }
    if (!readable) {  /* (a start past 2**64, or negative: _evaluate judges the trace) */
        *flags |= WANTED;
        return 0;
    }
    if (!sc->bounded || (start >= sc->since && (sc->endless || start < sc->until)))
        *flags |= INSIDE;
    if (*flags & WANTED)
        return 0;
    int verdict = sc->tests == NULL ? MAYBE : may_apply(sc->tests, values[2], a);
    if (verdict < 0)
        return -1;
    if (verdict != NO)
        *flags |= WANTED;
    return 0;
}

/* Every slot of a span but the trace id (the trace's); its flags added to *flags. */
static int put_span(writer *w, PyObject *span, PyObject *slots, const scope *sc, int *flags) {
    PyObject *values[SLOTS] = {NULL};
    attribute_views a = {{-1, NULL, NULL}};  /* (no attributes read yet) */
    int failed = 0;
    for (int i = 1; !failed && i < SLOTS; i++) {  /* (0 is the trace id) */
        PyObject *slot = PyTuple_GET_ITEM(slots, i);
        descrgetfunc get = Py_TYPE(slot)->tp_descr_get;
        values[i] = get == NULL ? NULL : get(slot, span, (PyObject *)Py_TYPE(span));
        if (values[i] == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "Packer: slots must be descriptors");
            failed = 1;
        } else {
            failed = (i == ATTRIBUTES ? put_attributes(w, values[i], &a)
                                      : put_value(w, values[i], SHARED[i])) < 0;
        }
    }
    failed = failed || judge_span(sc, values, &a.seen, flags) < 0;
    free_views(&a);
    for (int i = 1; i < SLOTS; i++)
        Py_XDECREF(values[i]);
    return failed ? -1 : 0;
}

static int hex_value(int c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static uint64_t fnv1a(const unsigned char *bytes, Py_ssize_t size, uint64_t seed) {
    uint64_t value = 14695981039346656037ULL ^ seed;
    for (Py_ssize_t i = 0; i < size; i++)
        value = (value ^ bytes[i]) * 1099511628211ULL;
    return value;
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
    return (Py_ssize_t)(fnv1a((const unsigned char *)text, size, (uint64_t)depth) %
                        (uint64_t)count);
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
    scope scope;
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
    Py_XDECREF(self->scope.tests);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A window's bound as starts (0 to 2**64 - 1) are compared with it: below 0 is 0; *beyond when
 * it is 2**64 or more. */
static int bound(PyObject *value, unsigned long long *out, int *beyond) {
    int overflow;
    long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (number == -1 && PyErr_Occurred())
        return -1;
    *beyond = 0;
    *out = overflow < 0 || (!overflow && number < 0) ? 0 : (unsigned long long)number;
    if (overflow > 0) {
        *out = PyLong_AsUnsignedLongLong(value);
        if (*out == (unsigned long long)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return -1;
            PyErr_Clear();
            *beyond = 1;
        }
    }
    return 0;
}

static int Packer_init(Packer *self, PyObject *args, PyObject *kwargs) {
    Py_ssize_t count;
    int depth;
    PyObject *slots, *tests = Py_None, *window = Py_None;
    static char *names[] = {"count", "depth", "slots", "tests", "window", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "niO!|OO:Packer", names, &count, &depth,
                                     &PyTuple_Type, &slots, &tests, &window))
        return -1;
    if ((tests != Py_None && !PyDict_Check(tests)) ||
            (window != Py_None && (!PyTuple_Check(window) || PyTuple_GET_SIZE(window) != 2))) {
        PyErr_SetString(PyExc_TypeError, "Packer: tests is a dict or None, window (since, until) "
                                         "or None");
        return -1;
    }
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
    scope *sc = &self->scope;
    if (window != Py_None) {
        int beyond;
        sc->bounded = 1;
        if (bound(PyTuple_GET_ITEM(window, 0), &sc->since, &beyond) < 0)
            return -1;
        /* since beyond every start: until stays 0, so nothing is inside */
        if (!beyond && bound(PyTuple_GET_ITEM(window, 1), &sc->until, &sc->endless) < 0)
            return -1;
    }
    sc->tests = tests == Py_None ? NULL : Py_NewRef(tests);
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
    Py_ssize_t before = w->size, head;
    self->broken = 1;  /* until this trace is written whole */
    if (put_value(w, trace_id, 0) < 0 || room(w, 1 + ENTRY_LENGTH) < 0)
        return -1;
    head = w->size;  /* the flags and length, filled in below */
    w->size += 1 + ENTRY_LENGTH;
    int flags = PyList_GET_SIZE(spans) == 0 ? WANTED | INSIDE : 0;  /* (known by id alone) */
    if (put_size(w, (uint64_t)PyList_GET_SIZE(spans)) < 0)
        return -1;
    for (Py_ssize_t s = 0; s < PyList_GET_SIZE(spans); s++)
        if (put_span(w, PyList_GET_ITEM(spans, s), self->slots, &self->scope, &flags) < 0)
            return -1;
    uint64_t length = (uint64_t)(w->size - head - 1 - ENTRY_LENGTH);
    if (length > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "Packer.add: one trace's spans past 4 GiB");
        return -1;
    }
    unsigned char *at = (unsigned char *)w->data + head;
    at[0] = (unsigned char)flags;
    for (int i = 0; i < ENTRY_LENGTH; i++)
        at[1 + i] = (unsigned char)(length >> (8 * i));
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
        writer head = {0};  /* the table of shared strs, then the count of entries */
        Py_ssize_t at = 0;
        PyObject *text, *index;
        int failed = put_size(&head, (uint64_t)PyDict_GET_SIZE(w->seen)) < 0;
        while (!failed && PyDict_Next(w->seen, &at, &text, &index)) {  /* (in index order) */
            Py_ssize_t size;
            const char *utf8 = PyUnicode_AsUTF8AndSize(text, &size);
            failed = utf8 == NULL || put_size(&head, (uint64_t)size) < 0 ||
                     put(&head, utf8, size) < 0;
        }
        failed = failed || put_size(&head, self->traces[i]) < 0;
        PyObject *chunk = failed ? NULL
                                 : PyBytes_FromStringAndSize(NULL, head.size + w->size);
        if (chunk != NULL) {
            memcpy(PyBytes_AS_STRING(chunk), head.data, (size_t)head.size);
            memcpy(PyBytes_AS_STRING(chunk) + head.size, w->data, (size_t)w->size);
        }
        PyMem_Free(head.data);
        if (chunk == NULL) {
            self->broken = 1;  /* (parts before this one are gone) */
            Py_DECREF(chunks);
            return NULL;
        }
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
        "Packer(count, depth, slots, tests=None, window=None): traces' spans packed into bytes,\n"
        "in `count` parts by trace id (part_of: eight hex digits of the id, other ones at each\n"
        "split depth); every slot but the trace id, read through `slots` (Span's member\n"
        "descriptors, in partitions.py's order); the strings spans share written once per part.\n"
        "Each trace entry says whether a rule may apply to it, by `tests` (span name -> a tuple\n"
        "of PlainTest, sidecar.dsl's scope tests as data, or None for any span of the name;\n"
        "without tests, every trace), and whether a span starts in `window` [since, until)."),
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

/* One packed value where it lies; a shared str by its table's str. */
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
        memcpy(v->tag == INT ? (void *)&v->integer : (void *)&v->number, at, 8);
        return 0;
    case TEXT: case MARSHAL:
        if (get_size(r, &size) < 0 || size > (uint64_t)PY_SSIZE_T_MAX ||
                get_bytes(r, (Py_ssize_t)size, &at) < 0)
            return -1;
        v->text = (const char *)at;
        v->size = (Py_ssize_t)size;
        return 0;
    case SEEN:
        if (get_size(r, &size) < 0)
            return -1;
        if (r->seen == NULL || size >= (uint64_t)PyList_GET_SIZE(r->seen))
            return corrupt();
        v->shared = PyList_GET_ITEM(r->seen, (Py_ssize_t)size);
        v->tag = TEXT;
        v->text = PyUnicode_AsUTF8AndSize(v->shared, &v->size);
        return v->text == NULL ? -1 : 0;
    default:
        return corrupt();
    }
}

static PyObject *get_value(reader *r) {
    view v;
    if (read_view(r, &v) < 0)
        return NULL;
    switch (v.tag) {
    case NONE: return Py_NewRef(Py_None);
    case TRUE: return Py_NewRef(Py_True);
    case FALSE: return Py_NewRef(Py_False);
    case INT: return PyLong_FromLongLong(v.integer);
    case FLOAT: return PyFloat_FromDouble(v.number);
    case TEXT: return v.shared != NULL ? Py_NewRef(v.shared)
                                       : PyUnicode_DecodeUTF8(v.text, v.size, NULL);
    }
    return PyMarshal_ReadObjectFromString(v.text, v.size);  /* MARSHAL */
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

/* A chunk's table of shared strs, read into r->seen. */
static int open_chunk(reader *r) {
    uint64_t count, size;
    const unsigned char *at;
    if (get_size(r, &count) < 0)
        return -1;
    if (count > (uint64_t)(r->end - r->p))  /* (each takes a byte or more) */
        return corrupt();
    for (uint64_t i = 0; i < count; i++) {
        if (get_size(r, &size) < 0 || size > (uint64_t)PY_SSIZE_T_MAX ||
                get_bytes(r, (Py_ssize_t)size, &at) < 0)
            return -1;
        PyObject *text = PyUnicode_DecodeUTF8((const char *)at, (Py_ssize_t)size, NULL);
        int failed = text == NULL || PyList_Append(r->seen, text) < 0;
        Py_XDECREF(text);
        if (failed)
            return -1;
    }
    return 0;
}

/* An entry's head: its trace id (a new reference; NULL with an error), flags, and where it ends. */
/* An entry's head after its trace id: its flags, and where it ends. */
static int entry_head(reader *r, int *flags, const unsigned char **end) {
    const unsigned char *at;
    if (get_bytes(r, 1 + ENTRY_LENGTH, &at) < 0)
        return -1;
    uint64_t length = 0;
    for (int i = 0; i < ENTRY_LENGTH; i++)
        length |= (uint64_t)at[1 + i] << (8 * i);
    if (length > (uint64_t)(r->end - r->p))
        return corrupt();
    *flags = at[0];
    *end = r->p + length;
    return 0;
}

/* An entry's head: its trace id (a new reference; NULL with an error), flags, and where it ends. */
static PyObject *get_entry(reader *r, int *flags, const unsigned char **end) {
    PyObject *trace_id = get_value(r);
    if (trace_id == NULL)
        return NULL;
    if (!PyUnicode_CheckExact(trace_id) || entry_head(r, flags, end) < 0) {
        if (!PyErr_Occurred())
            corrupt();
        Py_DECREF(trace_id);
        return NULL;
    }
    return trace_id;
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
"`only`, the trace entries whose ids are not in it are jumped over, nothing made. A span\n"
"without attributes shares `empty`, which must never be changed.");

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
    if (r.seen == NULL || open_chunk(&r) < 0 || get_size(&r, &count) < 0)
        goto fail;
    for (uint64_t t = 0; t < count; t++) {
        int flags;
        const unsigned char *end;
        PyObject *trace_id = get_entry(&r, &flags, &end);
        int wanted = trace_id == NULL ? -1 : only == Py_None ? 1 : PySet_Contains(only, trace_id);
        PyObject *bucket = wanted == 1 ? bucket_of(traces, trace_id) : NULL;
        if (wanted < 0 || (wanted && (bucket == NULL || get_size(&r, &spans) < 0))) {
            Py_XDECREF(trace_id);
            goto fail;
        }
        if (!wanted) {
            Py_DECREF(trace_id);
            r.p = end;
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
        if (r.p != end) {
            corrupt();
            goto fail;
        }
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

/* --- judging whole traces without making their spans ---------------------------------------- */

/* A trace's spans as views: each span's name, id and attributes (in the trace's arrays). */
typedef struct {
    view name, id;
    Py_ssize_t first;  /* its attributes' index in the trace's arrays */
    span_attributes attributes;  /* (pointing into them once all spans are read) */
} span_view;

typedef struct {
    span_view *spans;
    Py_ssize_t count, room;
    PyObject **keys;
    view *values;
    Py_ssize_t used, capacity;  /* of keys and values */
} trace_view;

static int read_attributes(reader *r, trace_view *t, span_view *s) {
    s->first = t->used;
    s->attributes.count = 0;
    if (r->p < r->end && *r->p == EMPTY) {
        r->p++;
        return 0;
    }
    if (r->p >= r->end || *r->p != DICT) {
        view ignored;
        s->attributes.count = -1;
        return read_view(r, &ignored);
    }
    r->p++;
    uint64_t count;
    if (get_size(r, &count) < 0)
        return -1;
    if (count > (uint64_t)(r->end - r->p) / 2)  /* (a key and a value take two bytes or more) */
        return corrupt();
    Py_ssize_t room = t->capacity;
    if (grow((void **)&t->keys, &room, t->used + (Py_ssize_t)count, sizeof(PyObject *)) < 0 ||
            grow((void **)&t->values, &t->capacity, t->used + (Py_ssize_t)count,
                 sizeof(view)) < 0)
        return -1;
    int strings = 1;
    for (uint64_t i = 0; i < count; i++) {
        view key;
        if (read_view(r, &key) < 0 || read_view(r, &t->values[t->used]) < 0)
            return -1;
        strings &= key.shared != NULL;
        t->keys[t->used++] = key.shared;
    }
    s->attributes.count = strings ? (Py_ssize_t)count : -1;
    return 0;
}

static int read_span(reader *r, trace_view *t) {
    if (grow((void **)&t->spans, &t->room, t->count + 1, sizeof(span_view)) < 0)
        return -1;
    span_view *s = &t->spans[t->count++];
    view ignored;
    for (int i = 1; i < SLOTS; i++) {  /* (the trace id is the entry's) */
        int failed = i == ATTRIBUTES ? read_attributes(r, t, s)
                                     : read_view(r, i == 1 ? &s->id : i == 2 ? &s->name
                                                                             : &ignored);
        if (failed < 0)
            return -1;
    }
    return 0;
}

static int test_trace(PyObject *expr, const void *on, const span_attributes *this);

/* Whether a span of the trace is named `name` and passes `where` (None: any): NO, YES or MAYBE. */
static int exists(const trace_view *t, PyObject *name, PyObject *where,
                  const span_attributes *this) {
    int result = NO;
    for (Py_ssize_t i = 0; i < t->count && result != YES; i++) {
        const span_view *s = &t->spans[i];
        if (s->name.shared == NULL || !same_str(s->name.shared, name))
            continue;
        int passes = where == Py_None ? YES : test_span(where, &s->attributes, this);
        result = passes == NO ? result : passes;
    }
    return result;
}

/* A PlainExpr on a trace_view (`on`), `this` as in test_span: NO, YES or MAYBE. */
static int test_trace(PyObject *expr, const void *on, const span_attributes *this) {
    if (!PyTuple_Check(expr) || PyTuple_GET_SIZE(expr) < 1)
        return MAYBE;
    long kind = number_in(PyTuple_GET_ITEM(expr, 0));
    int combined = logic(expr, kind, test_trace, on, this);
    if (combined >= 0)
        return combined;
    if (kind != T_EXISTS || PyTuple_GET_SIZE(expr) != 3 ||
            !PyUnicode_CheckExact(PyTuple_GET_ITEM(expr, 1)))
        return MAYBE;
    return exists(on, PyTuple_GET_ITEM(expr, 1), PyTuple_GET_ITEM(expr, 2), this);
}

static int any_of(int first, int second) {  /* three-valued or */
    return first == YES || second == YES ? YES : first == MAYBE || second == MAYBE ? MAYBE : NO;
}

/* Whether `always` (None: none) is false or `never` (None: none) true on the trace, `this` as in
 * test_span: NO, YES or MAYBE. */
static int failing(PyObject *always, PyObject *never, const trace_view *t,
                   const span_attributes *this) {
    int fails = NO;
    if (always != Py_None) {
        int held = test_trace(always, t, this);
        fails = held == MAYBE ? MAYBE : !held;
    }
    return never == Py_None ? fails : any_of(fails, test_trace(never, t, this));
}

/* Whether a PlainRule applies to the trace and whether it fires there, as sidecar.rules'
 * `evaluate` has it (a rule that does not apply never fires): each NO, YES or MAYBE. */
static void judge_rule(PyObject *rule, const trace_view *t, int *applies, int *fires) {
    *applies = *fires = MAYBE;
    Py_ssize_t size = PyTuple_Check(rule) ? PyTuple_GET_SIZE(rule) : 0;
    long form = size ? number_in(PyTuple_GET_ITEM(rule, 0)) : -1;
    if (form == R_CONDITION && size == 3 && PyTuple_Check(PyTuple_GET_ITEM(rule, 1))) {
        PyObject *names = PyTuple_GET_ITEM(rule, 1);
        *applies = NO;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names) && *applies == NO; i++) {
            if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(names, i)))
                *applies = MAYBE;
            else if (exists(t, PyTuple_GET_ITEM(names, i), Py_None, NULL) == YES)
                *applies = YES;
        }
        *fires = *applies == NO ? NO : test_trace(PyTuple_GET_ITEM(rule, 2), t, NULL);
        return;
    }
    if (form == R_WHEN && size == 4) {
        *applies = test_trace(PyTuple_GET_ITEM(rule, 1), t, NULL);
        *fires = *applies == NO ? NO : failing(PyTuple_GET_ITEM(rule, 2),
                                               PyTuple_GET_ITEM(rule, 3), t, NULL);
        return;
    }
    if (form != R_FOR_EACH || size != 5 || !PyUnicode_CheckExact(PyTuple_GET_ITEM(rule, 1)))
        return;
    PyObject *name = PyTuple_GET_ITEM(rule, 1), *where = PyTuple_GET_ITEM(rule, 2);
    PyObject *always = PyTuple_GET_ITEM(rule, 3), *never = PyTuple_GET_ITEM(rule, 4);
    *applies = *fires = NO;
    for (Py_ssize_t i = 0; i < t->count; i++) {  /* each span it checks, as `this` */
        const span_view *s = &t->spans[i];
        if (s->name.shared == NULL || !same_str(s->name.shared, name))
            continue;
        int selected = where == Py_None ? YES : test_span(where, &s->attributes, NULL);
        if (selected == NO)
            continue;
        *applies = any_of(*applies, selected);
        /* (MAYBE for a span maybe selected: applies is) */
        *fires = any_of(*fires, failing(always, never, t, &s->attributes));
    }
}

/* Whether no rule fires on the trace, each rule's verdict known (then each rule that applies is
 * counted in `applied`, with `applies` room for one flag per rule). A trace with a span id twice
 * is left to `evaluate`, which counts each id once. */
static int judged(PyObject *rules, const trace_view *t, Py_ssize_t *applied, char *applies) {
    for (Py_ssize_t i = 0; i < t->count; i++) {
        const view *id = &t->spans[i].id;
        if (id->tag != TEXT || (t->spans[i].name.shared == NULL && t->spans[i].name.tag == MARSHAL))
            return 0;
        for (Py_ssize_t j = 0; j < i; j++)
            if (t->spans[j].id.size == id->size &&
                    memcmp(t->spans[j].id.text, id->text, (size_t)id->size) == 0)
                return 0;
    }
    for (Py_ssize_t r = 0; r < PyTuple_GET_SIZE(rules); r++) {
        int applying, firing;
        judge_rule(PyTuple_GET_ITEM(rules, r), t, &applying, &firing);
        if (applying == MAYBE || firing != NO)
            return 0;
        applies[r] = (char)applying;
    }
    for (Py_ssize_t r = 0; r < PyTuple_GET_SIZE(rules); r++)
        applied[r] += applies[r];
    return 1;
}

#define FEW_SPANS 64  /* beyond, a trace is left to evaluate (repeated span ids: looked for here
                          pair by pair) */

/* Where a trace's spans lie in one chunk, and its entry before (-1: none). */
typedef struct {
    const unsigned char *spans, *end;
    uint64_t count;
    Py_ssize_t chunk, next;
} entry_at;

/* A trace of the chunks: its id as packed (a str's tag, size and UTF-8, found again by these
 * bytes), what its entries' flags say, and its last entry. */
typedef struct {
    const unsigned char *id;
    Py_ssize_t size;
    uint64_t hash, spans;  /* (spans: of all its entries) */
    int flags, by_id, odd;  /* by_id: an entry without spans; odd: an id not packed as TEXT */
    Py_ssize_t last;
} trace_at;

/* The chunks' traces, found by their packed ids (open addressing; a slot holds index + 1). */
typedef struct {
    trace_at *traces;
    Py_ssize_t count, room, *slots;
    size_t mask;  /* slots - 1, a power of two less one */
    entry_at *entries;
    Py_ssize_t entry_count, entry_room;
} trace_index;

static int rehash(trace_index *x, size_t slots) {
    Py_ssize_t *grown = PyMem_Calloc(slots, sizeof(Py_ssize_t));
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t t = 0; t < x->count; t++) {
        size_t at = (size_t)x->traces[t].hash & (slots - 1);
        while (grown[at])
            at = (at + 1) & (slots - 1);
        grown[at] = t + 1;
    }
    PyMem_Free(x->slots);
    x->slots = grown;
    x->mask = slots - 1;
    return 0;
}

/* The trace whose id is packed as `id` (made on first sight); -1 with an error. */
static Py_ssize_t trace_of(trace_index *x, const unsigned char *id, Py_ssize_t size) {
    if ((size_t)(x->count + 1) * 2 > x->mask + 1 && rehash(x, 2 * (x->mask + 1)) < 0)
        return -1;
    uint64_t hash = fnv1a(id, size, 0);
    size_t at = (size_t)hash & x->mask;
    for (; x->slots[at]; at = (at + 1) & x->mask) {
        trace_at *t = &x->traces[x->slots[at] - 1];
        if (t->hash == hash && t->size == size && memcmp(t->id, id, (size_t)size) == 0)
            return x->slots[at] - 1;
    }
    if (grow((void **)&x->traces, &x->room, x->count + 1, sizeof(trace_at)) < 0)
        return -1;
    x->traces[x->count] = (trace_at){id, size, hash, 0, 0, 0, *id != TEXT, -1};
    x->slots[at] = x->count + 1;
    return x->count++;
}

/* Every entry of `chunks` into `x`, with the chunks' tables of shared strs into `tables`. */
static int index_chunks(PyObject *chunks, PyObject *tables, trace_index *x) {
    for (Py_ssize_t c = 0; c < PyList_GET_SIZE(chunks); c++) {
        PyObject *data = PyList_GET_ITEM(chunks, c);
        if (!PyBytes_Check(data)) {
            PyErr_SetString(PyExc_TypeError, "judge: chunks are bytes");
            return -1;
        }
        reader r = {(const unsigned char *)PyBytes_AS_STRING(data), NULL, PyList_New(0)};
        r.end = r.p + PyBytes_GET_SIZE(data);
        int failed = r.seen == NULL || PyList_Append(tables, r.seen) < 0;
        Py_XDECREF(r.seen);  /* (held by tables) */
        uint64_t count, spans;
        if (failed || open_chunk(&r) < 0 || get_size(&r, &count) < 0)
            return -1;
        for (uint64_t e = 0; e < count; e++) {
            const unsigned char *id = r.p, *end;
            view ignored;
            int flags;
            if (read_view(&r, &ignored) < 0)
                return -1;
            Py_ssize_t size = r.p - id, t;
            if (entry_head(&r, &flags, &end) < 0 || (t = trace_of(x, id, size)) < 0 ||
                    get_size(&r, &spans) < 0 || grow((void **)&x->entries, &x->entry_room,
                                                     x->entry_count + 1, sizeof(entry_at)) < 0)
                return -1;
            trace_at *trace = &x->traces[t];
            trace->flags |= flags;
            trace->spans += spans;
            trace->by_id |= spans == 0;
            x->entries[x->entry_count] = (entry_at){r.p, end, spans, c, trace->last};
            trace->last = x->entry_count++;
            r.p = end;
        }
        if (r.p != r.end)
            return corrupt();
    }
    return 0;
}

/* A trace's spans, from all its entries, into `t`. */
static int read_trace(const trace_index *x, const trace_at *trace, PyObject *tables,
                      trace_view *t) {
    t->count = t->used = 0;
    for (Py_ssize_t e = trace->last; e >= 0; e = x->entries[e].next) {
        const entry_at *entry = &x->entries[e];
        reader r = {entry->spans, entry->end, PyList_GET_ITEM(tables, entry->chunk)};
        for (uint64_t s = 0; s < entry->count; s++)
            if (read_span(&r, t) < 0)
                return -1;
        if (r.p != r.end)
            return corrupt();
    }
    for (Py_ssize_t s = 0; s < t->count; s++) {
        t->spans[s].attributes.keys = t->keys + t->spans[s].first;
        t->spans[s].attributes.values = t->values + t->spans[s].first;
    }
    return 0;
}

/* The trace's id as a str, into `left`. */
static int leave(const trace_at *trace, PyObject *left) {
    reader r = {trace->id, trace->id + trace->size, NULL};
    PyObject *trace_id = get_value(&r);
    int failed = trace_id == NULL || (!PyUnicode_CheckExact(trace_id) && corrupt() < 0) ||
                 PySet_Add(left, trace_id) < 0;
    Py_XDECREF(trace_id);
    return failed ? -1 : 0;
}

PyDoc_STRVAR(judge_doc,
"judge(chunks: list[bytes], rules: tuple) -> tuple[set[str], list[int], int]\n\n"
"Judge the traces of one partition's chunks (each whole: its entries in every chunk) from the\n"
"packed bytes, by what the Packer noted of each entry and by `rules`, PlainRules (sidecar.dsl's\n"
"CompiledExpr.plain). Returns the ids of the traces left for evaluating (a rule may fire, it\n"
"cannot tell, or no span starts in the window but one may apply), per rule the number of the\n"
"others it applies to, and the number of those others that count as evaluated (a span in the\n"
"window).");

static PyObject *judge(PyObject *module, PyObject *args) {
    PyObject *chunks, *rules;
    if (!PyArg_ParseTuple(args, "O!O!:judge", &PyList_Type, &chunks, &PyTuple_Type, &rules))
        return NULL;
    Py_ssize_t rule_count = PyTuple_GET_SIZE(rules), counted = 0;
    PyObject *tables = PyList_New(0), *left = PySet_New(NULL), *result = NULL;
    trace_index x = {0};
    trace_view t = {0};
    Py_ssize_t *applied = PyMem_Calloc((size_t)rule_count + 1, sizeof(Py_ssize_t));
    char *applies = PyMem_Calloc((size_t)rule_count + 1, 1);
    if ((applied == NULL || applies == NULL) && !PyErr_Occurred())
        PyErr_NoMemory();
    if (tables == NULL || left == NULL || applied == NULL || applies == NULL ||
            rehash(&x, 1024) < 0 || index_chunks(chunks, tables, &x) < 0)
        goto done;
    for (Py_ssize_t n = 0; n < x.count; n++) {
        const trace_at *trace = &x.traces[n];
        int inside = trace->flags & INSIDE;
        if (!trace->odd && !(trace->flags & WANTED)) {
            counted += inside != 0;  /* (no rule applies: evaluated in vain) */
            continue;
        }
        if (!trace->odd && inside && !trace->by_id && trace->spans <= FEW_SPANS) {
            if (read_trace(&x, trace, tables, &t) < 0)
                goto done;
            if (judged(rules, &t, applied, applies)) {
                counted++;
                continue;
            }
        }
        if (leave(trace, left) < 0)
            goto done;
    }
    PyObject *counts = PyList_New(rule_count);
    for (Py_ssize_t r = 0; counts != NULL && r < rule_count; r++) {
        PyObject *count = PyLong_FromSsize_t(applied[r]);
        if (count == NULL)
            Py_CLEAR(counts);
        else
            PyList_SET_ITEM(counts, r, count);
    }
    if (counts != NULL)
        result = Py_BuildValue("(ONn)", left, counts, counted);
done:
    Py_XDECREF(tables);
    Py_XDECREF(left);
    PyMem_Free(x.traces);
    PyMem_Free(x.slots);
    PyMem_Free(x.entries);
    PyMem_Free(t.spans);
    PyMem_Free(t.keys);
    PyMem_Free(t.values);
    PyMem_Free(applied);
    PyMem_Free(applies);
    return result;
}

static PyMethodDef methods[] = {
    {"unpack", unpack, METH_VARARGS, unpack_doc},
    {"judge", judge, METH_VARARGS, judge_doc},
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
