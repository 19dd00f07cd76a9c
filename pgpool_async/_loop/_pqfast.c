/*
 * pgpool_async._loop._pqfast: the loop-native runner's per-statement libpq calls in C.
 *
 * Optional. Without it (no compiler at install time, another Python) the runner makes
 * the same calls through ctypes (native.py), each costing a ctypes call: about a fifth
 * of a SELECT 1's client CPU. Nothing here links against libpq: bind() receives the
 * addresses of the functions of the libpq psycopg2 loaded (found by _libpq.py), so the
 * calls go to exactly that library. Every call is non-blocking (the connection is in
 * non-blocking mode while the runner holds it) and made with the GIL held, as the
 * ctypes path's PyDLL does.
 *
 * What each function does is the ctypes path's code, line for line; native.py falls
 * back to that code for anything out of the ordinary (COPY, errors, SSL, a send not
 * yet flushed).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* libpq's enums (libpq-fe.h), as native.py spells them too. */
#define CONNECTION_BAD 1
#define PGRES_COMMAND_OK 1
#define PGRES_TUPLES_OK 2

typedef int (*pg_send_t)(void *, const char *);
typedef int (*pg_int_t)(void *);
typedef void *(*pg_result_t)(void *);
typedef int (*res_int_t)(const void *);
typedef void (*res_void_t)(void *);
typedef unsigned int (*res_oid_t)(const void *, int);
typedef char *(*res_value_t)(const void *, int, int);
typedef int (*res_cell_t)(const void *, int, int);

static struct {
    pg_send_t send_query;
    pg_int_t flush;
    pg_int_t consume_input;
    pg_int_t is_busy;
    pg_result_t get_result;
    pg_int_t status;
    res_int_t result_status;
    res_void_t clear;
    res_int_t ntuples;
    res_int_t nfields;
    res_oid_t ftype;
    res_value_t getvalue;
    res_cell_t getlength;
    res_cell_t getisnull;
    int bound;
} pq;

/* psycopg2's typecaster objects (typecastObject), as set_typecast() describes them:
 * a NULL cell goes to the Python function of a caster made by new_type(), as
 * psycopg2 does (its C casters map NULL to None themselves); a cell of a builtin
 * C caster goes to its C function directly, as psycopg2's own row building does
 * (typecast_cast), without a bytes object, an argument tuple and their parsing.
 * Array casters are left to the object's call: their C function reads the base
 * caster from the cursor, which only psycopg2's typecast_cast sets. */
typedef PyObject *(*typecast_function)(const char *str, Py_ssize_t len, PyObject *cursor);

static struct {
    PyTypeObject *type;
    Py_ssize_t ccast;
    Py_ssize_t pcast;
    Py_ssize_t bcast;
} tc = {NULL, -1, -1, -1};

/* The C function to call for cast's non-NULL cells, or NULL: call the object. */
static typecast_function
c_caster(PyObject *cast)
{
    if (tc.type == NULL || Py_TYPE(cast) != tc.type)
        return NULL;
    if (*(PyObject **)((char *)cast + tc.bcast) != NULL)
        return NULL;
    return *(typecast_function *)((char *)cast + tc.ccast);
}

/* The Python function behind cast (borrowed), or NULL when a NULL cell is None. */
static PyObject *
python_caster(PyObject *cast)
{
    if (tc.type == NULL || Py_TYPE(cast) != tc.type)
        return NULL;
    if (*(void **)((char *)cast + tc.ccast) != NULL)
        return NULL;
    return *(PyObject **)((char *)cast + tc.pcast);
}

static int
as_pointer(PyObject *obj, void **out)
{
    if (obj == Py_None) {
        *out = NULL;
        return 1;
    }
    *out = PyLong_AsVoidPtr(obj);
    return !(*out == NULL && PyErr_Occurred());
}

static PyObject *
pointer_or_none(void *ptr)
{
    if (ptr == NULL)
        Py_RETURN_NONE;
    return PyLong_FromVoidPtr(ptr);
}

static int
check_bound(void)
{
    if (!pq.bound) {
        PyErr_SetString(PyExc_RuntimeError, "_pqfast.bind() was not called");
        return 0;
    }
    return 1;
}

/* Every function but bind(): check the argument count, that bind() ran, and
 * take the first argument, a PGconn * or PGresult * (not NULL). */
static int
unpack(const char *name, Py_ssize_t nargs, Py_ssize_t expected, PyObject *first, void **out)
{
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, expected, nargs);
        return 0;
    }
    if (!check_bound() || !as_pointer(first, out))
        return 0;
    if (*out == NULL) {
        PyErr_Format(PyExc_ValueError, "%s(): a NULL pointer", name);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(bind_doc,
"bind(PQsendQuery, PQflush, PQconsumeInput, PQisBusy, PQgetResult, PQstatus,\n"
"     PQresultStatus, PQclear, PQntuples, PQnfields, PQftype, PQgetvalue,\n"
"     PQgetlength, PQgetisnull)\n\n"
"The addresses of the libpq functions to call (ints, none 0).");

static PyObject *
fast_bind(PyObject *self, PyObject *args)
{
    void *p[14];
    if (PyTuple_GET_SIZE(args) != 14) {
        PyErr_SetString(PyExc_TypeError, "bind() takes 14 function addresses");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < 14; i++) {
        if (!as_pointer(PyTuple_GET_ITEM(args, i), &p[i]))
            return NULL;
        if (p[i] == NULL) {
            PyErr_SetString(PyExc_ValueError, "bind(): a function address is 0");
            return NULL;
        }
    }
    pq.send_query = (pg_send_t)p[0];
    pq.flush = (pg_int_t)p[1];
    pq.consume_input = (pg_int_t)p[2];
    pq.is_busy = (pg_int_t)p[3];
    pq.get_result = (pg_result_t)p[4];
    pq.status = (pg_int_t)p[5];
    pq.result_status = (res_int_t)p[6];
    pq.clear = (res_void_t)p[7];
    pq.ntuples = (res_int_t)p[8];
    pq.nfields = (res_int_t)p[9];
    pq.ftype = (res_oid_t)p[10];
    pq.getvalue = (res_value_t)p[11];
    pq.getlength = (res_cell_t)p[12];
    pq.getisnull = (res_cell_t)p[13];
    pq.bound = 1;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(set_typecast_doc,
"set_typecast(type, ccast_offset, pcast_offset, bcast_offset)\n\n"
"Where psycopg2's typecaster objects (of ``type``) keep their C, Python and base\n"
"casting functions (checked by the caller): NULL cells then reach a Python caster\n"
"as None, and the cells of a builtin non-array caster its C function directly.");

static PyObject *
fast_set_typecast(PyObject *self, PyObject *args)
{
    PyObject *type;
    Py_ssize_t ccast, pcast, bcast;
    if (!PyArg_ParseTuple(args, "O!nnn", &PyType_Type, &type, &ccast, &pcast, &bcast))
        return NULL;
    Py_INCREF(type);
    Py_XSETREF(tc.type, (PyTypeObject *)type);
    tc.ccast = ccast;
    tc.pcast = pcast;
    tc.bcast = bcast;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(send_doc,
"send(pg, query: bytes) -> int\n\n"
"PQsendQuery then PQflush: PQflush's answer (0 sent, 1 more to send, -1 failed),\n"
"or -2 when PQsendQuery failed (PQerrorMessage says why).");

static PyObject *
fast_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *pg;
    if (!unpack("send", nargs, 2, args[0], &pg))
        return NULL;
    if (!PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "send(pg, query): query must be bytes");
        return NULL;
    }
    if (!pq.send_query(pg, PyBytes_AS_STRING(args[1])))
        return PyLong_FromLong(-2);
    return PyLong_FromLong(pq.flush(pg));
}

PyDoc_STRVAR(pump_doc,
"pump(pg, last, prev, keep_prev: bool) -> (code, last, prev, added, status)\n\n"
"PQconsumeInput, then every result libpq has complete (PQisBusy before each\n"
"PQgetResult, so it never waits). Each result becomes ``last``; the one before is\n"
"cleared, or kept as ``prev`` with ``keep_prev`` (its ``prev`` cleared). ``added``:\n"
"how many results were read; ``status``: the last one's PQresultStatus.\n"
"code: 0 busy (more to come), 1 the final NULL was read, 2 a result whose status\n"
"is not COMMAND_OK or TUPLES_OK was read (the caller handles it, then goes on),\n"
"3 busy on a dead connection, -1 PQconsumeInput failed.");

static PyObject *
fast_pump(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *pg, *last, *prev, *res;
    int code, added = 0, status = -1;
    if (!unpack("pump", nargs, 4, args[0], &pg) || !as_pointer(args[1], &last) ||
        !as_pointer(args[2], &prev))
        return NULL;
    int keep_prev = PyObject_IsTrue(args[3]);
    if (keep_prev < 0)
        return NULL;
    if (!pq.consume_input(pg)) {
        code = -1;
    }
    else {
        for (;;) {
            if (pq.is_busy(pg)) {
                code = pq.status(pg) == CONNECTION_BAD ? 3 : 0;
                break;
            }
            res = pq.get_result(pg);
            if (res == NULL) {
                code = 1;
                break;
            }
            if (keep_prev) {
                if (prev != NULL)
                    pq.clear(prev);
                prev = last;
            }
            else if (last != NULL) {
                pq.clear(last);
            }
            last = res;
            added++;
            status = pq.result_status(res);
            if (status != PGRES_TUPLES_OK && status != PGRES_COMMAND_OK) {
                code = 2;
                break;
            }
        }
    }
    PyObject *out = PyTuple_New(5);
    if (out == NULL)
        return NULL; /* (the results stay referenced by nobody: only on MemoryError) */
    PyObject *items[5] = {PyLong_FromLong(code), pointer_or_none(last), pointer_or_none(prev),
                          PyLong_FromLong(added), PyLong_FromLong(status)};
    for (int i = 0; i < 5; i++) {
        if (items[i] == NULL) {
            Py_DECREF(out);
            for (int j = i + 1; j < 5; j++)
                Py_XDECREF(items[j]);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, items[i]);
    }
    return out;
}

/* Rows start to stop of res appended to rows (a list) as tuples: NULL cells are
 * None, the others cast(value_bytes, cur) with casts[column]. 0, or -1 on error. */
static int
append_rows(void *res, PyObject *casts, PyObject *cur, long start, long stop, PyObject *rows)
{
    Py_ssize_t ncols = PyList_GET_SIZE(casts);
    /* Each column's C function, looked up once per call (wide rows: none). */
    typecast_function direct[64] = {NULL};
    if (ncols <= 64) {
        for (Py_ssize_t column = 0; column < ncols; column++)
            direct[column] = c_caster(PyList_GET_ITEM(casts, column));
    }
    for (long r = start; r < stop; r++) {
        PyObject *row = PyTuple_New(ncols);
        if (row == NULL)
            return -1;
        for (Py_ssize_t column = 0; column < ncols; column++) {
            PyObject *cell;
            if (pq.getisnull(res, (int)r, (int)column)) {
                PyObject *pcast = python_caster(PyList_GET_ITEM(casts, column));
                if (pcast == NULL) {
                    cell = Py_NewRef(Py_None);
                }
                else {
                    PyObject *call_args[2] = {Py_None, cur};
                    cell = PyObject_Vectorcall(pcast, call_args, 2, NULL);
                    if (cell == NULL) {
                        Py_DECREF(row);
                        return -1;
                    }
                }
            }
            else if (ncols <= 64 && direct[column] != NULL) {
                cell = direct[column](pq.getvalue(res, (int)r, (int)column),
                                      pq.getlength(res, (int)r, (int)column), cur);
                if (cell == NULL) {
                    Py_DECREF(row);
                    return -1;
                }
            }
            else {
                PyObject *raw = PyBytes_FromStringAndSize(pq.getvalue(res, (int)r, (int)column),
                                                          pq.getlength(res, (int)r, (int)column));
                if (raw == NULL) {
                    Py_DECREF(row);
                    return -1;
                }
                PyObject *call_args[2] = {raw, cur};
                cell = PyObject_Vectorcall(PyList_GET_ITEM(casts, column), call_args, 2, NULL);
                Py_DECREF(raw);
                if (cell == NULL) {
                    Py_DECREF(row);
                    return -1;
                }
            }
            PyTuple_SET_ITEM(row, column, cell);
        }
        int failed = PyList_Append(rows, row);
        Py_DECREF(row);
        if (failed)
            return -1;
    }
    return 0;
}

PyDoc_STRVAR(convert_doc,
"convert(res, casts: list, cursor, start, stop, rows: list) -> rows\n\n"
"Rows ``start`` to ``stop`` of ``res`` appended to ``rows`` as tuples: each cell\n"
"None when NULL, else ``casts[column](value_bytes, cursor)``.");

static PyObject *
fast_convert(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *res;
    if (!unpack("convert", nargs, 6, args[0], &res))
        return NULL;
    PyObject *casts = args[1], *rows = args[5];
    long start = PyLong_AsLong(args[3]), stop = PyLong_AsLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyList_Check(casts) || !PyList_Check(rows) || PyList_GET_SIZE(casts) != pq.nfields(res)) {
        PyErr_SetString(PyExc_TypeError, "convert(res, casts: one per column, cursor, start, stop, rows: list)");
        return NULL;
    }
    if (append_rows(res, casts, args[2], start, stop, rows) < 0)
        return NULL;
    return Py_NewRef(rows);
}

static PyObject *
lookup_cast(PyObject *types, PyObject *oid)
{
    /* A borrowed reference, NULL if absent (or on error: the caller checks). */
    if (types == NULL || !PyDict_Check(types) || PyDict_GET_SIZE(types) == 0)
        return NULL;
    return PyDict_GetItemWithError(types, oid);
}

/* Each column's typecaster, looked up as psycopg2 does (a new list), or NULL on error. */
static PyObject *
lookup_casts(void *res, PyObject *cur, PyObject *const *types, PyObject *fallback)
{
    int nfields = pq.nfields(res);
    PyObject *casts = PyList_New(nfields);
    if (casts == NULL)
        return NULL;
    for (int column = 0; column < nfields; column++) {
        PyObject *oid = PyLong_FromUnsignedLong(pq.ftype(res, column));
        if (oid == NULL)
            goto failed;
        PyObject *cast = lookup_cast(types[0], oid);
        if (cast == NULL && !PyErr_Occurred())
            cast = lookup_cast(types[1], oid);
        if (cast == NULL && !PyErr_Occurred())
            cast = lookup_cast(types[2], oid);
        if (cast != NULL) {
            Py_INCREF(cast);
        }
        else if (!PyErr_Occurred()) {
            PyObject *call_args[2] = {cur, oid};
            cast = PyObject_Vectorcall(fallback, call_args, 2, NULL);
        }
        Py_DECREF(oid);
        if (cast == NULL)
            goto failed;
        PyList_SET_ITEM(casts, column, cast);
    }
    return casts;
failed:
    Py_DECREF(casts);
    return NULL;
}

PyDoc_STRVAR(casts_doc,
"casts(res, cursor, cursor_types, conn_types, global_types, fallback) -> list\n\n"
"Each column's typecaster, as psycopg2 looks it up when a statement ends: in\n"
"``cursor_types``, then ``conn_types``, then ``global_types`` (dicts by type OID),\n"
"else ``fallback(cursor, oid)``. For :func:`convert`.");

static PyObject *
fast_casts(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *res;
    if (!unpack("casts", nargs, 6, args[0], &res))
        return NULL;
    return lookup_casts(res, args[1], args + 2, args[5]);
}

PyDoc_STRVAR(head_doc,
"head(res, cursor, cursor_types, conn_types, global_types, fallback, count) -> (list, int)\n\n"
"The first ``count`` rows of ``res`` converted as :func:`rows` converts them (the\n"
"typecasters looked up only if a row is converted), and how many rows it has.");

static PyObject *
fast_head(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *res;
    if (!unpack("head", nargs, 7, args[0], &res))
        return NULL;
    long count = PyLong_AsLong(args[6]);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    int ntuples = pq.ntuples(res);
    long stop = count < ntuples ? count : ntuples;
    PyObject *rows = PyList_New(0);
    if (rows == NULL)
        return NULL;
    if (stop > 0) {
        PyObject *casts = lookup_casts(res, args[1], args + 2, args[5]);
        int failed = casts == NULL || append_rows(res, casts, args[1], 0, stop, rows) < 0;
        Py_XDECREF(casts);
        if (failed) {
            Py_DECREF(rows);
            return NULL;
        }
    }
    return Py_BuildValue("(Ni)", rows, ntuples);
}

PyDoc_STRVAR(ntuples_doc, "ntuples(res) -> int\n\nPQntuples(res).");

static PyObject *
fast_ntuples(PyObject *self, PyObject *arg)
{
    void *res;
    if (!check_bound() || !as_pointer(arg, &res))
        return NULL;
    if (res == NULL) {
        PyErr_SetString(PyExc_ValueError, "ntuples(): a NULL pointer");
        return NULL;
    }
    return PyLong_FromLong(pq.ntuples(res));
}

PyDoc_STRVAR(rows_doc,
"rows(res, cursor, cursor_types, conn_types, global_types, fallback, limit) -> list | None\n\n"
"Every row of ``res`` as tuples, converted as psycopg2 converts them: the casts of\n"
":func:`casts`, then as :func:`convert`. None when ``res`` has more than ``limit``\n"
"rows (the caller converts those a slice at a time).");

static PyObject *
fast_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *res;
    if (!unpack("rows", nargs, 7, args[0], &res))
        return NULL;
    long limit = PyLong_AsLong(args[6]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    int ntuples = pq.ntuples(res);
    if (ntuples > limit)
        Py_RETURN_NONE;
    PyObject *casts = lookup_casts(res, args[1], args + 2, args[5]);
    if (casts == NULL)
        return NULL;
    PyObject *rows = PyList_New(0);
    if (rows == NULL || append_rows(res, casts, args[1], 0, ntuples, rows) < 0) {
        Py_XDECREF(rows);
        rows = NULL;
    }
    Py_DECREF(casts);
    return rows;
}

PyDoc_STRVAR(clear_doc, "clear(res) -> None\n\nPQclear(res); None does nothing.");

static PyObject *
fast_clear(PyObject *self, PyObject *arg)
{
    void *res;
    if (!check_bound() || !as_pointer(arg, &res))
        return NULL;
    if (res != NULL)
        pq.clear(res);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"bind", fast_bind, METH_VARARGS, bind_doc},
    {"set_typecast", fast_set_typecast, METH_VARARGS, set_typecast_doc},
    {"send", (PyCFunction)(void (*)(void))fast_send, METH_FASTCALL, send_doc},
    {"pump", (PyCFunction)(void (*)(void))fast_pump, METH_FASTCALL, pump_doc},
    {"convert", (PyCFunction)(void (*)(void))fast_convert, METH_FASTCALL, convert_doc},
    {"casts", (PyCFunction)(void (*)(void))fast_casts, METH_FASTCALL, casts_doc},
    {"rows", (PyCFunction)(void (*)(void))fast_rows, METH_FASTCALL, rows_doc},
    {"head", (PyCFunction)(void (*)(void))fast_head, METH_FASTCALL, head_doc},
    {"ntuples", fast_ntuples, METH_O, ntuples_doc},
    {"clear", fast_clear, METH_O, clear_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_pqfast",
    "The loop-native runner's per-statement libpq calls in C (optional; see native.py).",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit__pqfast(void)
{
    return PyModule_Create(&module);
}
