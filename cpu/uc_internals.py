"""Two switches of Unicorn 2.1.4 that its API does not offer, for a guest that runs long
(hclsim/real_linux.py): they live in Unicorn's private `struct uc_struct` (include/uc_priv.h),
found here by a fingerprint and refused unless it matches exactly.

- `no_exit_request`. Unicorn's translator puts a helper call after every guest load and store
  (tcg-op.c check_exit_request) so that a stop asked for inside a block ends it at once. That
  call, and the register spills around it, cost a Linux boot ~10% of its time; the only user of
  the switch in Unicorn is ARM's IT blocks. With it set, a stop asked for inside a block takes
  effect where the next block starts (gen_tb_start's check stays, and the block hook runs before
  it). It is read when code is translated: `set_memory_exit_checks` drops the translations.
  Code hooks need the check to stop before their instruction (a debugger's breakpoints, a hook
  that writes RIP), so whoever adds one keeps the checks on.
- `skip_sync_pc_on_exit`. Each instruction hook (IN, OUT, CPUID, RDTSC, SYSCALL) first rebuilds
  the guest state at the instruction from the block's code (cpu_restore_state, about a
  microsecond) unless this is set; Unicorn sets it only when a hook writes RIP and clears it at
  every emu_start. For those instructions the translator has already stored RIP (except IN/OUT,
  whose hooks here do not read it), so the block hook may set it again at each block (the
  byte's address is fastpath's H_SKIP_SYNC).

The fingerprint: emu_start stores its `until` argument in `exits[0]` when exits are off, so a
run with a marker address finds that field; the fields after it are fixed-size (checked against
the header: target_page_size 4096, target_page_align 4095, qemu_icache_linesize, the 1 GiB
code buffer, init_done set). Any mismatch (another Unicorn) and `available()` is False: the
engine then runs as before, only slower.
"""
import ctypes
import struct

import unicorn
from unicorn import Uc, UC_ARCH_X86, UC_MODE_64

# Offsets from exits[0], from include/uc_priv.h of 2.1.4 (x86-64 Linux, glibc's 200-byte
# sigjmp_buf): compiled once with the fields' C types.
_MARKER = 0x5A5A_1234_5678                   # an address no test code runs at
_TARGET_PAGE_SIZE = 552                      # uint32 4096, then target_page_align 4095
_ICACHE_LINESIZE = 576                       # int, 64 on x86
_NO_EXIT_REQUEST = 602                       # bool, between first_tb and init_done (603)
_TCG_BUFFER_SIZE = 13432                     # uint32
_SKIP_SYNC = 13466                           # bool, the struct's last field
_SCAN = 8192                                 # bytes of the struct searched for exits[0]

_offsets: dict | None = None


def _handle(uc) -> int:
    h = uc._uch
    return h.value if hasattr(h, "value") else int(h)


def _locate() -> dict:
    """{'exits': offset of exits[0]} on a scratch engine, or {} if the layout is not 2.1.4's."""
    if unicorn.__version__ != "2.1.4":
        return {}
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, b"\x90" * 16)
    uc.emu_start(0x1000, _MARKER, count=1)
    head = ctypes.string_at(_handle(uc), _SCAN)               # within the struct (~15 KB)
    needle = _MARKER.to_bytes(8, "little")
    hits = [i for i in range(0, _SCAN, 8) if head[i:i + 8] == needle]
    if len(hits) != 1:
        return {}
    x = hits[0]
    raw = ctypes.string_at(_handle(uc), x + _SKIP_SYNC + 1)   # to the struct's last field
    page_size, page_align = struct.unpack_from("<II", raw, x + _TARGET_PAGE_SIZE)
    (icache,) = struct.unpack_from("<i", raw, x + _ICACHE_LINESIZE)
    (code_buffer,) = struct.unpack_from("<I", raw, x + _TCG_BUFFER_SIZE)
    no_exit, init_done = raw[x + _NO_EXIT_REQUEST], raw[x + _NO_EXIT_REQUEST + 1]
    if (page_size, page_align) != (4096, 4095) or icache not in (32, 64, 128) or code_buffer != 1 << 30 \
            or (no_exit, init_done) != (0, 1) or raw[x + _SKIP_SYNC] != 0:
        return {}
    return {"exits": x}


def available() -> bool:
    global _offsets
    if _offsets is None:
        _offsets = _locate()
    return bool(_offsets)


def _byte(uc, offset: int) -> ctypes.c_uint8:
    if not available():
        raise RuntimeError("Unicorn's private state is not 2.1.4's layout")
    return ctypes.c_uint8.from_address(_handle(uc) + _offsets["exits"] + offset)


def memory_exit_checks(uc) -> bool:
    """Whether code translated now checks for a stop after each load and store."""
    return not available() or _byte(uc, _NO_EXIT_REQUEST).value == 0


def set_memory_exit_checks(uc, on: bool) -> bool:
    """Checks after loads and stores in code translated from now on (on: Unicorn's default).
    Drops every translation when it changes. False if the switch is not available (on then)."""
    if not available():
        return False
    flag = _byte(uc, _NO_EXIT_REQUEST)
    if flag.value != (0 if on else 1):
        flag.value = 0 if on else 1
        uc.ctl_flush_tb()
    return True


def skip_sync_address(uc) -> int:
    """The address of `skip_sync_pc_on_exit` (0 if not available), for the block hook."""
    return ctypes.addressof(_byte(uc, _SKIP_SYNC)) if available() else 0
