"""What a pickle would build, checked before anything is built.

A pickle is a program: its opcodes push values, call the globals it names and fill containers.
``scan`` reads that program (``pickletools.genops``: it decodes opcodes, it builds nothing) and
follows what each opcode would make, so that a file is refused, in one line, before the real
unpickler allocates anything, when:

- it names a global outside ``Rules.globals`` (code, or a type torch registers as safe that no
  checkpoint needs: exceptions, ``traceback.FrameSummary``, ...), or calls an admitted global
  with arguments outside what its real pickles carry (``numpy.dtype`` of a plain numeric kind
  only, with numpy's own state, never crafted fields or flags; ``numpy.ndarray`` only inside
  ``_reconstruct``; ``_codecs.encode`` to latin1 only);
- an array or tensor claims more bytes than the data the file gives it (numpy) or than its
  storage holds (torch), or all arrays together more than ``Rules.max_bytes(file size)``;
- it has more than ``Rules.max_opcodes`` opcodes, or what it builds, with every shared reference
  expanded (a tuple holding itself twice, 60 times over), more than ``Rules.max_objects``
  objects or deeper than ``Rules.max_depth``; or a cycle.

The bounds make the time and memory of a load linear in the file's size: a scan is one pass,
and what passes builds at most ``max_objects`` objects and ``max_bytes`` of arrays.
"""
import io
import pickletools
import re
from math import prod

import numpy as np

MAX_OPCODES = 500_000
MAX_OBJECTS = 1_000_000
MAX_DEPTH = 64
# plain numeric numpy dtypes, as numpy pickles them ('f4', '<i8', 'b1', ...)
NUMERIC_DTYPE = re.compile(r"[<>|=]?[biufc]\d{1,2}")


class NotData(Exception):
    """What the pickle names or builds that is not plain data (args[0]: its name)."""


class OutOfBounds(Exception):
    """A bound the pickle exceeds (args[0]: which, in words)."""


class Damaged(Exception):
    """A pickle that does not decode (truncated, bad opcode, stack misuse)."""


class V:
    """A value the pickle would build: its kind, a literal value when small, its children
    (containers), and the bytes of array data it holds."""
    __slots__ = ("kind", "value", "children", "nbytes", "used")

    def __init__(self, kind, value=None, children=None, nbytes=0):
        self.kind, self.value, self.children, self.nbytes = kind, value, children, nbytes
        self.used = False  # a dtype or array already given its state (BUILD)

    def literal(self):
        if self.kind == "tuple":
            return tuple(c.literal() for c in self.children)
        if self.kind in ("lit", "global"):
            return self.value
        return self


LITERAL_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT",
               "BINFLOAT", "NONE", "NEWTRUE", "NEWFALSE", "STRING", "BINSTRING",
               "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
               "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


def _lit(op, arg):
    if op in CONSTANTS:
        return V("lit", CONSTANTS[op])
    if isinstance(arg, (bytes, bytearray, str)):
        # a string's value is kept (names, keys, dtype specs); a long one only by its length
        value = arg if isinstance(arg, str) else bytes(arg)
        return V("lit", value if len(arg) <= 256 else None, nbytes=len(arg))
    return V("lit", arg)


def _int(v, what):
    x = v.literal()
    if type(x) is not int or x < 0:
        raise NotData(f"{what} {x!r}")
    return x


def _shape(v, what):
    shape = v.literal()
    if not (isinstance(shape, tuple) and all(type(s) is int and s >= 0 for s in shape)):
        raise NotData(f"{what} {shape!r}")
    return shape


def _data_length(v):
    """The length of a bytes or (Python 2, latin1) string value."""
    if v.kind == "lit" and (isinstance(v.value, (bytes, str)) or
                            (v.value is None and v.nbytes)):
        return v.nbytes
    raise NotData("array data that is not bytes")


# ---------------------------------------------------------------- numpy
def numpy_dtype(args):
    spec, *flags = args.literal()
    if not (isinstance(spec, str) and NUMERIC_DTYPE.fullmatch(spec)
            and all(_flag(f) for f in flags) and len(flags) == 2):
        raise NotData(f"numpy.dtype{args.literal()!r} (only plain numeric dtypes are data)")
    return V("dtype", np.dtype(spec))


def numpy_dtype_state(dtype, state):
    """numpy's own state of a plain dtype: (3|4, byteorder, None, None, None, -1, -1, flags
    of that dtype[, None]); anything else (fields, subarrays, crafted flags) is refused."""
    s = state.literal()
    plain = (isinstance(s, tuple) and len(s) in (8, 9) and s[0] in (3, 4)
             and s[1] in ("<", ">", "|", "=") and s[2:5] == (None, None, None)
             and s[5:7] == (-1, -1) and type(s[7]) is int and s[7] == dtype.value.flags
             and (len(s) == 8 or s[8] is None))
    if not plain:
        raise NotData(f"numpy.dtype state {s!r} (only a plain numeric dtype's)")
    dtype.value = dtype.value.newbyteorder(s[1]) if s[1] in "<>" else dtype.value


def _flag(x):
    """A boolean as numpy pickles it: True/False, or 0/1 in Python 2 pickles."""
    return type(x) in (bool, int) and x in (0, 1)


def _dtype(v):
    if v.kind != "dtype":
        raise NotData("an array or scalar whose dtype is not a plain numeric dtype")
    return v.value


def numpy_reconstruct(args):
    cls, shape, code = args.children
    if cls.kind != "global" or cls.value != "numpy.ndarray" or shape.literal() != (0,) or \
            code.literal() not in (b"b", "b"):
        raise NotData("numpy _reconstruct of something other than an empty ndarray")
    return V("array_pending")


def numpy_array_state(array, state):
    if state.kind != "tuple" or len(state.children) != 5:
        raise NotData("numpy array state that is not (version, shape, dtype, fortran, data)")
    _, shape, dtype, fortran, data = state.children
    shape, dtype = _shape(shape, "numpy array shape"), _dtype(dtype)
    if not _flag(fortran.literal()):
        raise NotData("numpy array state")
    size = prod(shape) * dtype.itemsize
    if _data_length(data) != size:
        raise NotData(f"a numpy array of {size} bytes given {_data_length(data)} bytes")
    array.kind, array.nbytes, array.children = "array", size, []


def numpy_frombuffer(args):
    if len(args.children) != 4:
        raise NotData("numpy _frombuffer")
    data, dtype, shape, order = args.children
    shape, dtype = _shape(shape, "numpy array shape"), _dtype(dtype)
    size = prod(shape) * dtype.itemsize
    if _data_length(data) != size or order.literal() not in ("C", "F"):
        raise NotData(f"a numpy array of {size} bytes given {_data_length(data)} bytes")
    return V("array", nbytes=size, children=[])


def numpy_scalar(args):
    if len(args.children) != 2:
        raise NotData("numpy scalar")
    dtype, data = args.children
    dtype = _dtype(dtype)
    if _data_length(data) != dtype.itemsize:
        raise NotData(f"a numpy {dtype} scalar given {_data_length(data)} bytes")
    return V("lit", None, nbytes=dtype.itemsize)


# ---------------------------------------------------------------- plain python
def ordered_dict(args):
    if args.literal() != ():
        raise NotData("collections.OrderedDict with arguments")
    return V("dict", children=[])


def new_set(args):
    if not (len(args.children) <= 1 and all(c.kind == "list" for c in args.children)):
        raise NotData("builtins.set of something other than a list")
    return V("set", children=list(args.children))


def latin1_bytes(args):
    text, encoding = (args.children + [V("lit", "utf-8")])[:2]
    if text.kind != "lit" or not isinstance(text.value, (str, type(None))) or \
            encoding.literal() not in ("latin1", "latin-1"):
        raise NotData("_codecs.encode other than text to latin1")
    return V("lit", None if text.value is None else text.value.encode("latin1", "replace"),
             nbytes=text.nbytes)


def namespace(args):
    if args.literal() != ():
        raise NotData("argparse.Namespace with arguments")
    return V("object", children=[])


# ---------------------------------------------------------------- torch
def storage_itemsize():
    """{'FloatStorage': 4, ...}: torch's storage types, as their pickles name them."""
    import torch
    from torch.serialization import StorageType

    sizes = {"UntypedStorage": 1}
    for cls in torch._storage_classes:
        if cls.__name__ not in ("TypedStorage", "UntypedStorage"):
            sizes[cls.__name__] = StorageType(cls.__name__).dtype.itemsize
    return sizes


def torch_tensor(args, storage, offset, size, stride, itemsize=None):
    if storage.kind != "storage":
        raise NotData("a tensor whose storage is not one of the file's")
    offset, size, stride = _int(offset, "tensor offset"), _shape(size, "tensor size"), \
        _shape(stride, "tensor stride")
    numel, itemsize = storage.value[0], itemsize or storage.value[1]
    count = prod(size)
    if len(size) != len(stride) or count and (
            count > numel or offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel):
        raise OutOfBounds(f"a tensor of size {size} over a storage of {numel} elements")
    return V("tensor", nbytes=count * itemsize, children=[storage])


def _empty_hooks(v):
    if v.kind != "dict" or v.children:
        raise NotData("a tensor with backward hooks")


def rebuild_tensor_v2(args):
    c = args.children
    if len(c) not in (6, 7) or type(c[4].literal()) is not bool:
        raise NotData("torch._utils._rebuild_tensor_v2 arguments")
    _empty_hooks(c[5])
    if len(c) == 7 and not (c[6].kind == "dict" and not c[6].children):
        raise NotData("tensor metadata")
    return torch_tensor(args, *c[:4])


def rebuild_tensor(args):
    if len(args.children) != 4:
        raise NotData("torch._utils._rebuild_tensor arguments")
    return torch_tensor(args, *args.children)


def rebuild_parameter(args):
    c = args.children
    if len(c) != 3 or c[0].kind != "tensor" or type(c[1].literal()) is not bool:
        raise NotData("torch._utils._rebuild_parameter arguments")
    _empty_hooks(c[2])
    return c[0]


def torch_size(args):
    if len(args.children) != 1:
        raise NotData("torch.Size arguments")
    return V("lit", _shape(args.children[0], "torch.Size"))


def torch_device(args):
    if not all(isinstance(x, (str, int)) for x in args.literal()):
        raise NotData("torch.device arguments")
    return V("lit", args.literal())


class Rules:
    """What a kind of file may hold: `calls` {global: what calling it builds}, `values`
    (globals admitted as values, not called), `persistent` (how a persistent id is read, or
    None), and the bounds."""

    def __init__(self, calls, values=(), persistent=None, newobj=(), data_values=(),
                 max_opcodes=MAX_OPCODES, max_objects=MAX_OBJECTS, max_depth=MAX_DEPTH):
        self.calls, self.values, self.persistent = calls, set(values), persistent
        # the globals that may be part of the data built (torch dtypes); the others only as
        # what they are for (numpy.ndarray inside _reconstruct, a storage type in its id)
        self.data_values = set(data_values)
        self.newobj = set(newobj)  # classes a pickle may instantiate (NEWOBJ) then fill (BUILD)
        self.max_opcodes, self.max_objects, self.max_depth = max_opcodes, max_objects, max_depth

    @staticmethod
    def max_bytes(file_size):
        """All arrays and tensors together, shared references counted each time: at most
        twice the file (a tensor view of another's storage is legal), plus 1 MiB."""
        return 2 * file_size + (1 << 20)

    def admits(self, name):
        return name in self.calls or name in self.values or name in self.newobj


NUMPY_CALLS = {"numpy.dtype": numpy_dtype, "collections.OrderedDict": ordered_dict,
               "_codecs.encode": latin1_bytes, "builtins.set": new_set,
               "builtins.frozenset": new_set, "__builtin__.set": new_set,
               "__builtin__.frozenset": new_set,
               # numpy 1.x and 2.x spell their modules differently
               **{f"numpy.{core}.{name}": call for core in ("core", "_core")
                  for name, call in (("multiarray._reconstruct", numpy_reconstruct),
                                     ("multiarray.scalar", numpy_scalar),
                                     ("numeric._frombuffer", numpy_frombuffer))}}

# detectron2 .pkl files: numpy arrays, scalars, dtypes and plain containers
PKL_RULES = Rules(NUMPY_CALLS, values={"numpy.ndarray"})


def torch_rules(persistent):
    """torch files: tensors (their storages through `persistent`), plain containers,
    argparse.Namespace (DINO, SwAV and others save their arguments) and numpy's data types."""
    import torch

    dtypes = {f"torch.{name}" for name in dir(torch) if isinstance(getattr(torch, name, None),
                                                                      torch.dtype)}
    calls = dict(NUMPY_CALLS, **{
        "torch._utils._rebuild_tensor_v2": rebuild_tensor_v2,
        "torch._utils._rebuild_tensor": rebuild_tensor,
        "torch._utils._rebuild_parameter": rebuild_parameter,
        "torch.Size": torch_size, "torch.device": torch_device})
    storages = {f"torch.{name}" for name in storage_itemsize()}
    return Rules(calls, values={"numpy.ndarray", *dtypes, *storages},
                 persistent=persistent, newobj={"argparse.Namespace"}, data_values=dtypes)


# ---------------------------------------------------------------- the scan
class Machine:
    """The pickle machine's stack and memo, holding V's instead of objects."""

    def __init__(self, rules):
        self.rules, self.stack, self.memo, self.metastack = rules, [], {}, []

    def floor(self):
        return self.metastack[-1] if self.metastack else 0

    def pop(self):
        if len(self.stack) <= self.floor():
            raise Damaged("stack underflow")
        return self.stack.pop()

    def pop_mark(self):
        if not self.metastack:
            raise Damaged("no MARK")
        i = self.metastack.pop()
        items = self.stack[i:]
        del self.stack[i:]
        return items

    def top(self):
        if len(self.stack) <= self.floor():
            raise Damaged("stack underflow")
        return self.stack[-1]

    def global_(self, module, name):
        full = f"{module}.{name}"
        if not self.rules.admits(full):
            raise NotData(full)
        self.stack.append(V("global", full))

    def call(self, func, args):
        if func.kind != "global" or args.kind != "tuple":
            raise NotData("a call of something other than a global")
        handler = self.rules.calls.get(func.value)
        if handler is None:
            raise NotData(f"a call of {func.value}")
        try:
            return handler(args)
        except (ValueError, TypeError, AttributeError, IndexError) as e:
            raise NotData(f"{func.value} with arguments {str(e)[:80]}") from None

    def build(self, obj, state):
        if obj.kind == "dtype" and not obj.used:
            numpy_dtype_state(obj, state)
        elif obj.kind == "array_pending":
            numpy_array_state(obj, state)
        elif obj.kind in ("object", "dict") and not obj.used and state.kind == "dict":
            # a Namespace's attributes; an OrderedDict's (a state dict's _metadata)
            obj.children.append(state)
        else:
            raise NotData(f"a state given to {obj.kind}")
        obj.used = True

    def step(self, op, arg):
        s = self.stack
        if op in LITERAL_OPS:
            s.append(_lit(op, arg))
        elif op in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
            s.append(V(op[6:].lower(), children=[]))
        elif op in ("EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
            n = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}.get(op)
            items = self.pop_mark() if n is None else [self.pop() for _ in range(n)][::-1]
            s.append(V("tuple", children=items))
        elif op in ("LIST", "DICT", "FROZENSET"):
            s.append(V({"LIST": "list", "DICT": "dict", "FROZENSET": "set"}[op],
                       children=self.pop_mark()))
        elif op in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"):
            items = self.pop_mark() if op.endswith("S") else \
                [self.pop() for _ in range(2 if op == "SETITEM" else 1)][::-1]
            target = self.top()
            kind = {"APPEND": "list", "APPENDS": "list", "ADDITEMS": "set"}.get(op, "dict")
            if target.kind != kind or (kind == "dict" and len(items) % 2):
                raise NotData(f"{op} on {target.kind}")
            target.children.extend(items)
        elif op == "MARK":
            self.metastack.append(len(s))
        elif op == "POP":
            if self.metastack and self.metastack[-1] == len(s):
                self.metastack.pop()
            else:
                self.pop()
        elif op == "POP_MARK":
            self.pop_mark()
        elif op == "DUP":
            s.append(self.top())
        elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[arg] = self.top()
        elif op == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif op in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise Damaged(f"memo key {arg} missing")
            s.append(self.memo[arg])
        elif op == "GLOBAL":
            module, _, name = arg.partition(" ")
            self.global_(module, name)
        elif op == "STACK_GLOBAL":
            name, module = self.pop(), self.pop()
            if not (isinstance(module.value, str) and isinstance(name.value, str)):
                raise Damaged("STACK_GLOBAL of non-strings")
            self.global_(module.value, name.value)
        elif op == "REDUCE":
            args = self.pop()
            s.append(self.call(self.pop(), args))
        elif op in ("NEWOBJ", "NEWOBJ_EX"):
            if op == "NEWOBJ_EX":
                self.pop()
            args, cls = self.pop(), self.pop()
            if cls.kind != "global" or cls.value not in self.rules.newobj:
                raise NotData(f"an instance of {cls.value if cls.kind == 'global' else cls.kind}")
            s.append(namespace(args))
        elif op == "BUILD":
            state = self.pop()
            self.build(self.top(), state)
        elif op == "BINPERSID" and self.rules.persistent:
            s.append(self.rules.persistent(self.pop()))
        elif op in ("PROTO", "FRAME"):
            pass
        else:  # INST, OBJ, EXT*, PERSID, NEXT_BUFFER, READONLY_BUFFER, BINPERSID in a .pkl
            raise NotData(f"the pickle opcode {op}")


def measure(root, rules, file_size):
    """(objects, bytes) of what `root` expands to, every shared reference counted; refuses
    cycles and structures deeper than the bound."""
    done, active = {}, set()
    max_bytes = rules.max_bytes(file_size)

    def walk(v, depth):
        key = id(v)
        if key in done:
            return done[key]
        if key in active:
            raise OutOfBounds("a cycle (an object holding itself)")
        if depth > rules.max_depth:
            raise OutOfBounds(f"nesting deeper than {rules.max_depth}")
        if v.kind == "global" and v.value not in rules.data_values:
            raise NotData(f"{v.value} as a value")
        active.add(key)
        objects, nbytes = 1, v.nbytes if v.kind in ("array", "tensor") else 0
        for c in v.children or ():
            o, b = walk(c, depth + 1)
            objects, nbytes = objects + o, nbytes + b
            if objects > rules.max_objects:
                raise OutOfBounds(f"more than {rules.max_objects} objects once shared "
                                  "references are expanded")
            if nbytes > max_bytes:
                raise OutOfBounds(f"arrays of more than {max_bytes} bytes in a file of "
                                  f"{file_size} bytes")
        active.discard(key)
        done[key] = objects, nbytes
        return done[key]

    return walk(root, 0)


def scan(stream, rules, file_size):
    """Follow one pickle from `stream` (a BytesIO, left after its STOP) under `rules`; returns
    the V it would build. Raises NotData, OutOfBounds or Damaged."""
    machine = Machine(rules)
    try:
        for n, (opcode, arg, _) in enumerate(pickletools.genops(stream)):
            if n >= rules.max_opcodes:
                raise OutOfBounds(f"more than {rules.max_opcodes} pickle opcodes")
            if opcode.name == "STOP":
                break
            machine.step(opcode.name, arg)
        else:
            raise Damaged("no STOP opcode: the pickle is cut short")
    except (ValueError, UnicodeDecodeError, OverflowError) as e:  # genops: bad opcode or argument
        raise Damaged(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    root = machine.pop()
    measure(root, rules, file_size)
    return root


def scan_bytes(data, rules):
    return scan(io.BytesIO(data), rules, len(data))
