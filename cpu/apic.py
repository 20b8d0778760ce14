"""The local APIC as the hypervisor models it: MSR indexes, register bits, and the per-VP APIC
table (one int64 row per VP) that the hypervisor (hv/hypervisor.py) and the native MSR path
(cpu/msr_fastpath.py) both read and write."""
import numpy as np

X86_MSR_APIC_BASE = 0x1B
X2APIC_MSR_ID, X2APIC_MSR_VERSION, X2APIC_MSR_TPR = 0x802, 0x803, 0x808
X2APIC_MSR_EOI, X2APIC_MSR_SVR, X2APIC_MSR_ICR = 0x80B, 0x80F, 0x830
APIC_BASE_DEFAULT = 0xFEE00000
APIC_BASE_BSP, APIC_BASE_X2APIC, APIC_BASE_ENABLE = 1 << 8, 1 << 10, 1 << 11
APIC_BASE_WRITABLE = 0xFFFFFF000 | APIC_BASE_BSP | APIC_BASE_X2APIC | APIC_BASE_ENABLE
SVR_APIC_ENABLE = 1 << 8
APIC_VERSION = 0x50014  # version 0x14, max LVT 5

# Columns of the APIC table; PENDING is how many vectors wait in the VP's IRR.
APIC_COL_BASE, APIC_COL_SVR, APIC_COL_TPR, APIC_COL_PENDING = range(4)
APIC_COLUMNS = 4


def new_apic_table(vps: int) -> np.ndarray:
    """Per-VP local APIC registers at reset: xAPIC enabled at the default base, SVR 0xFF."""
    table = np.zeros((vps, APIC_COLUMNS), np.int64)
    table[:, APIC_COL_BASE] = APIC_BASE_DEFAULT | APIC_BASE_ENABLE
    table[:, APIC_COL_SVR] = 0xFF
    return table
