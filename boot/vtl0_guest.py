"""Loads the VTL0 test guest (boot/firmware/vtl0) into VTL0 RAM and gives every VP its VTL0
starting state, as VTL0 firmware would: identity page tables for the first 4 GiB (1 GiB pages),
a GDT, a results page, its command line page and a 16 KiB stack per VP (docs/contracts.md, "VTL0
test guest")."""
from dataclasses import dataclass

import numpy as np

from hclsim.defs.hvdef import HvRegister
from hclsim.hv import vtl
from hclsim.hv.vp import long_mode_context

IMAGE_GPA = 0x200000
PML4_GPA, PDPT_GPA, GDT_GPA = 0x1000, 0x2000, 0x3000
RESULTS_GPA = 0x10000
STACKS_GPA, STACK_SIZE = 0x400000, 16 * 1024
MMIO_TEST_BASE = 0xFED00000
TEST_PORT = 0x440
RESULT_MAGIC = 0x564F544C
RESULT_SIZE = 128

# The MMIO test range: VP n's slot is MMIO_TEST_BASE + MMIO_STRIDE * n; each instruction form the
# guest runs has its own offset in the slot (vtl0_guest.h names the forms).
MMIO_STRIDE = 64
MMIO_READ_OFF, MMIO_WRITE_OFF = 0x00, 0x04              # 32-bit load, 32-bit store (plain C)
MMIO_LOAD64_OFF, MMIO_STORE64_OFF = 0x08, 0x10          # 8 bytes, base + index*8 + disp8
MMIO_IMM64_OFF = 0x18                                   # mov qword [m], imm32 (sign-extended)
MMIO_ZX8_OFF, MMIO_HI8_OFF, MMIO_SX16_OFF = 0x20, 0x21, 0x22  # movzx r32 m8, mov ch m8, movsx r64 m16
MMIO_SX32_OFF, MMIO_U16_OFF = 0x24, 0x28                # movsxd r64 m32, mov cx m16
MMIO_IMM16_OFF, MMIO_STORE8_OFF, MMIO_HI8_STORE_OFF = 0x2A, 0x2C, 0x2D  # mov word imm16; r9b; ch
MMIO_PATTERN64 = 0x8877665544332211   # ^ vp: the register the r9b, ch and 8-byte stores write from
MMIO_PRELOAD = 0x0123456789ABCDEF     # every load's destination register before the load
MMIO_IMM16, MMIO_IMM32 = 0x5AA5, 0xA5A5A5A5

# Boot parameters beyond RDI..RCX: R8 = flags, R9 = the command line page (NUL-terminated),
# R10 = the image's span from IMAGE_GPA (what VP 0 measures into PCR 9).
FLAG_TPM = 0x1                        # the VM has a vTPM: VP 0 does a measured boot
CMDLINE_GPA, CMDLINE_MAX = 0x5000, 4095
# The vTPM as the guest drives it (devices/vtpm.py, x86 layout) and what its measured boot writes.
TPM_CONTROL_PORT, TPM_DATA_PORT = 0x1040, 0x1044
TPM_IO_VERSION, TPM_IO_MAP_SHARED_MEMORY = 0, 1
TPM_CRB_BASE, TPM_LOC_CTRL, TPM_START = 0xFED40000, 0x08, 0x4C
TPM_BUFFER_GPA, TPM_BUFFER_SIZE = 0x8000, 4096   # command buffer, then the response buffer
TPM_PCR_CMDLINE, TPM_PCR_IMAGE = 8, 9
TPM_RANDOM_BYTES = 16
TPM_NV_INDEX, TPM_NV_SIZE = 0x01500016, 8        # the boot counter, big endian
TPM_NV_ATTRIBUTES = 0x02060002                   # OWNERWRITE | OWNERREAD | AUTHREAD | NO_DA

result_dtype = np.dtype([("magic", "<u4"), ("vp_index", "<u4"), ("cpuid_ebx", "<u4"), ("cpuid_ecx", "<u4"),
                         ("cpuid_edx", "<u4"), ("in_value", "<u4"), ("mmio_value", "<u4"), ("pad", "<u4"),
                         ("msr_value", "<u8"), ("done", "<u4"), ("mmio_zx8", "<u4"), ("mmio_hi8", "<u8"),
                         ("mmio_sx16", "<u8"), ("mmio_sx32", "<u8"), ("mmio_u16", "<u8"), ("mmio_u64", "<u8"),
                         ("checksum", "<u8"), ("iterations", "<u4"), ("pad2", "<u4"),
                         ("hypercall_status", "<u8"), ("post_message", "u1", 16)])
assert result_dtype.itemsize == RESULT_SIZE


def record_values(rec) -> dict:
    """One results record as plain data: numbers, and byte arrays as hex."""
    return {name: (rec[name].tobytes().hex() if rec[name].ndim else int(rec[name])) for name in rec.dtype.names}


@dataclass(frozen=True)
class Vtl0Guest:
    image: object          # elfimage.FirmwareImage
    vp_count: int
    flags: int = 0         # R8: FLAG_TPM

    @property
    def entry(self) -> int:
        return IMAGE_GPA + self.image.entry

    def results(self, mem) -> np.ndarray:
        return mem.array(RESULTS_GPA, RESULT_SIZE * self.vp_count).view(result_dtype)


def load_vtl0_guest(mem, image, vp_count: int, vtl2_base: int, cmdline: str = "", tpm: bool = False) -> Vtl0Guest:
    """Write the guest, its page tables, GDT and command line page; returns the handle for its
    results. tpm: the VM has a vTPM (FLAG_TPM)."""
    top = STACKS_GPA + vp_count * STACK_SIZE
    if top > vtl2_base or IMAGE_GPA + image.span > STACKS_GPA:
        raise ValueError(f"VTL0 test guest for {vp_count} VPs needs VTL0 RAM up to {top:#x} (VTL2 starts at {vtl2_base:#x})")
    text = cmdline.encode()
    if len(text) > CMDLINE_MAX or b"\0" in text:
        raise ValueError(f"VTL0 command line: at most {CMDLINE_MAX} bytes and no NUL")
    # The whole span is what VP 0 measures: zero the gaps between segments and the BSS.
    mem.fill(IMAGE_GPA, image.span)
    for seg in image.segments:
        mem.write(IMAGE_GPA + seg.vaddr, seg.data)
    mem.fill(PML4_GPA, 0x3000)
    mem.write_u64(PML4_GPA, PDPT_GPA | 0x23)
    for gig in range(4):
        mem.write_u64(PDPT_GPA + 8 * gig, (gig << 30) | 0xE3)  # P RW A D PS
    for i, entry in enumerate((0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)):
        mem.write_u64(GDT_GPA + 8 * i, entry)
    mem.fill(CMDLINE_GPA, CMDLINE_MAX + 1)
    mem.write(CMDLINE_GPA, text)
    mem.fill(RESULTS_GPA, RESULT_SIZE * vp_count)
    return Vtl0Guest(image, vp_count, FLAG_TPM if tpm else 0)


def initial_state(guest: Vtl0Guest, vp: int, iterations: int) -> dict:
    """VTL0 registers of vp at the guest's entry (RDI = VP index, RSI = count, RDX = results,
    RCX = the workload loop's iteration count, BootConfig.vtl0_iterations; R8 = flags, R9 = the
    command line page, R10 = the image's span)."""
    ctx = long_mode_context(rip=guest.entry, rsp=STACKS_GPA + (vp + 1) * STACK_SIZE, cr3=PML4_GPA, gdt=(GDT_GPA, 0x1F),
                            cr0=0x80000031, cr4=0x620, efer=0xD00, cs=0x10, ds=0x18)   # PG NE ET PE; PAE OSFXSR OSXMMEXCPT
    return vtl.register_file(ctx, {HvRegister.Rdi: vp, HvRegister.Rsi: guest.vp_count, HvRegister.Rdx: RESULTS_GPA,
                                   HvRegister.Rcx: iterations, HvRegister.R8: guest.flags,
                                   HvRegister.R9: CMDLINE_GPA, HvRegister.R10: guest.image.span})
