"""Unicorn's C API for numba hooks.

The Python binding's hook_add wraps callbacks in Python; the hot exits instead register numba
`@cfunc`s directly with the C `uc_hook_add` (~12 ns a call, no GIL). Those cfuncs call back into
Unicorn (uc_reg_read/uc_reg_write) and, for rare slow paths, into Python through plain function
pointers stored in a state array: `call_*` intrinsics below turn an int64 address into a call, so
the compiled hooks hold no process-specific addresses and can be cached on disk by numba.
"""
import ctypes

from llvmlite import ir
from numba import types
from numba.extending import intrinsic
from unicorn import unicorn_const as ucc
from unicorn import x86_const as _x86
from unicorn.unicorn_py3.unicorn import uclib

# The hot calls without argtypes: ctypes' per-argument conversion doubled their cost
# (0.36 -> 0.18 us a register). Callers pass a c_void_p handle, plain ints and byref()s.
_raw = ctypes.CDLL(uclib._name)
raw_reg_read, raw_reg_write, raw_ctl = _raw.uc_reg_read, _raw.uc_reg_write, _raw.uc_ctl
raw_reg_read_batch, raw_reg_write_batch = _raw.uc_reg_read_batch, _raw.uc_reg_write_batch
for _fn in (raw_reg_read, raw_reg_write, raw_ctl):
    _fn.restype = ctypes.c_int

UC_REG_READ = ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p).value
UC_REG_WRITE = ctypes.cast(uclib.uc_reg_write, ctypes.c_void_p).value
UC_EMU_STOP = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value

_i8p = ir.IntType(8).as_pointer()
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)


@intrinsic
def call_reg_access(typingctx, fnptr, uc, regid, value_ptr):
    """int uc_reg_read/uc_reg_write(uc_engine*, int regid, void *value) through an address."""
    sig = types.int32(types.int64, types.voidptr, types.int32, types.voidptr)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(_i32, [_i8p, _i32, _i8p])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(fn, args[1:])
    return sig, codegen


@intrinsic
def call_uc_stop(typingctx, fnptr, uc):
    """int uc_emu_stop(uc_engine*) through an address."""
    sig = types.int32(types.int64, types.voidptr)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(_i32, [_i8p])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(fn, [args[1]])
    return sig, codegen


# uint32 slow_io(uc_engine*, uint32 port, int32 size, uint32 value, int32 is_in)
SLOW_IO_PROTO = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int32,
                                 ctypes.c_uint32, ctypes.c_int32)


@intrinsic
def call_slow_io(typingctx, fnptr, uc, port, size, value, is_in):
    sig = types.uint32(types.int64, types.voidptr, types.uint32, types.int32, types.uint32, types.int32)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(_i32, [_i8p, _i32, _i32, _i32, _i32])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(fn, args[1:])
    return sig, codegen


# int64 native_pio(void *device_state, int64 offset, int32 size, uint32 value, int32 is_write): a
# device's native port handler (devices/bus.py NativePio); a negative result sends the access to
# the device's Python handler instead.
@intrinsic
def call_native_pio(typingctx, fnptr, state, offset, size, value, is_write):
    sig = types.int64(types.int64, types.int64, types.int64, types.int32, types.uint32, types.int32)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(i64, [_i8p, i64, _i32, _i32, _i32])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(fn, [builder.inttoptr(args[1], _i8p), *args[2:]])
    return sig, codegen


# void slow_site(uc_engine*, uint64 address, int32 kind): a site the native hook leaves to Python
SLOW_SITE_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int32)


@intrinsic
def call_slow_site(typingctx, fnptr, uc, address, kind):
    sig = types.void(types.int64, types.voidptr, types.uint64, types.int32)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [_i8p, _i64, _i32])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        builder.call(fn, args[1:])
        return context.get_dummy_value()
    return sig, codegen


def hook_add(uc, kind: int, cfunc_address: int, user_data: int, insn: int | None = None,
             begin: int = 1, end: int = 0) -> int:
    """Register a native callback with uc_hook_add; returns the hook handle."""
    handle = ctypes.c_size_t()
    args = [uc._uch, ctypes.byref(handle), ctypes.c_int(kind), ctypes.c_void_p(cfunc_address),
            ctypes.c_void_p(user_data), ctypes.c_uint64(begin), ctypes.c_uint64(end)]
    if insn is not None:
        args.append(ctypes.c_int(insn))
    err = uclib.uc_hook_add(*args)
    if err != ucc.UC_ERR_OK:
        raise RuntimeError(f"uc_hook_add failed: error {err}")
    return handle.value


def hook_del(uc, handle: int) -> None:
    """uc_hook_del, keeping CR2: Unicorn drops the blocks that ran the hook, finding them through
    the page tables, and a miss there sets CR2 as a #PF would though the guest saw none."""
    with keeping_cr2(uc):
        uclib.uc_hook_del(uc._uch, ctypes.c_size_t(handle))


def binding_hook_del(uc, handle) -> None:
    """uc.hook_del (a hook the binding added), keeping CR2 (see hook_del)."""
    with keeping_cr2(uc):
        uc.hook_del(handle)


class keeping_cr2:
    def __init__(self, uc):
        self.uc = uc

    def __enter__(self):
        self.cr2 = self.uc.reg_read(_x86.UC_X86_REG_CR2)

    def __exit__(self, *exc):
        self.uc.reg_write(_x86.UC_X86_REG_CR2, self.cr2)


def uc_handle(uc) -> int:
    """The uc_engine* as an int, as hooks see it."""
    return ctypes.cast(uc._uch, ctypes.c_void_p).value
