"""The simulated platform, declared once: isolation types, the legacy I/O ports and the MMIO
ranges devices claim, and the VTL0 test guest's devices. The firmware's copies are
boot/firmware/include/hclsim_abi.h and boot/firmware/vtl0/vtl0_guest.h, checked by
tests/test_abi.py.
"""
from dataclasses import dataclass

# VM isolation (shim ABI, IgvmParameters): what the shim trusts of the host.
ISOLATION_NONE, ISOLATION_VBS, ISOLATION_SNP, ISOLATION_TDX = 0, 1, 2, 3
ISOLATION_BY_NAME = {"none": ISOLATION_NONE, "vbs": ISOLATION_VBS, "snp": ISOLATION_SNP, "tdx": ISOLATION_TDX}

# 16550 UARTs: COM3 is the boot shim's console (on the host's bus), COM1 the VTL0 guest's.
COM1_PORT, COM3_PORT = 0x3F8, 0x3E8
UART_PORT_COUNT = 8

# The legacy PC platform (devices/pic8259.py, pit8254.py, cmos_rtc.py): base ports and ISA IRQs.
PIC_MASTER_PORT, PIC_SLAVE_PORT = 0x20, 0xA0   # command, data: 2 ports each
PIC_ELCR_PORT = 0x4D0                          # ELCR1 (IRQ 0-7), ELCR2 (IRQ 8-15)
PIT_PORT = 0x40                                # channels 0-2 at 0x40-0x42
PIT_CONTROL_PORT = 0x43
SYSTEM_CONTROL_PORT_B = 0x61                   # NMI status and control: PIT channel 2 gate and output
RTC_INDEX_PORT, RTC_DATA_PORT = 0x70, 0x71     # CMOS index (bit 7: NMI disable), data
IRQ_PIT, IRQ_CASCADE, IRQ_COM1, IRQ_COM3, IRQ_RTC = 0, 2, 4, 4, 8


@dataclass(frozen=True)
class Region:
    """A named range of I/O ports or guest physical addresses: [start, start + size)."""
    name: str
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size

    def overlaps(self, other: "Region") -> bool:
        return self.start < other.end and other.start < self.end


# The VTL0 test guest's devices (boot/firmware/vtl0/vtl0_guest.h).
VTL0_COM1_PORT = COM1_PORT
VTL0_TEST_PORT = 0x440            # a 32-bit OUT, then a 32-bit IN
VTL0_TEST_PORT_VALUE = 0x1234ABCD  # what the test port reads
VTL0_OUT_PATTERN = 0xC0DE0000
VTL0_MMIO_BASE = 0xFED00000       # unmapped GPAs: every access is an MMIO intercept
VTL0_MMIO_SIZE = 0x20000          # a 64-byte slot per VP (VTL0_MMIO_STRIDE), 2048 VPs
VTL0_MMIO_READ_PATTERN = 0xF00D0000  # | offset: what a test MMIO read returns
VTL0_MMIO_PATTERN = 0xA5A50000
VTL0_TEST_MSR = 0x40000000
# The workload and the end of the run: ITER 32-bit OUTs of the iteration number to the loop port,
# folded into the record's checksum (FNV-1a, 64-bit, over the 32-bit iteration numbers:
# x = BASIS; x = (x ^ i) * PRIME), then a 32-bit OUT of the VP index to the power-off port ("this
# VP has finished"; the VM powers off once every VP has written it).
VTL0_LOOP_PORT = 0x444
VTL0_POWER_PORT = 0x404
VTL0_HYPERCALL_CODE = 0x005C        # HvCallPostMessage: the test guest's intercepted hypercall
VTL0_HYPERCALL_CONNECTION = 0       # posted to no open connection...
VTL0_HYPERCALL_STATUS = 0x0012      # ...so the VMM answers HV_STATUS_INVALID_CONNECTION_ID
VTL0_CHECKSUM_BASIS = 0xCBF29CE484222325
VTL0_CHECKSUM_PRIME = 0x100000001B3
VTL0_MAX_ITERATIONS = 10**9       # BootConfig.vtl0_iterations: 0..this (the guest counts in 32 bits)


# MemoryVtlType (openhcl-reference.md section 1): the openhcl,memory-type of each /openhcl
# memory node of the device tree the boot shim writes (and the VM worker's inspect reads).
MEMORY_VTL_TYPE = {
    "VTL0": 0, "VTL2_RAM": 1, "VTL2_CONFIG": 2, "SIDECAR_IMAGE": 3, "SIDECAR_NODE": 4,
    "VTL0_MMIO": 5, "VTL2_MMIO": 6, "VTL2_RESERVED": 7, "GPA_POOL": 8,
    "BOOTSHIM_LOG_BUFFER": 10, "PERSISTED_STATE_HEADER": 11, "PERSISTED_STATE_PROTOBUF": 12,
}
