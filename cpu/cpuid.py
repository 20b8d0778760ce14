"""The CPUID the guest sees: architectural leaves plus the Hyper-V leaves 0x40000000-0x4000000C
(shared/design/hyperv-essentials.md section 1), as a table the native CPUID hook looks up.

Rows are int64 [leaf, subleaf (-1 = any), eax, ebx, ecx, edx]. Per-VP values (the APIC id in
leaf 1 EBX and leaves 0xB/0x1F EDX) are patched in by cpuid_lookup from the running VP's id.
"""
import numpy as np
from numba import njit

from hclsim.defs.hvdef import HvCpuidLeaf as L
from hclsim.defs.platform import ISOLATION_NONE, ISOLATION_VBS

ANY_SUBLEAF = -1
MAX_BASIC_LEAF = 0x1F
MAX_HV_LEAF = L.IsolationConfiguration
PHYSICAL_ADDRESS_BITS = 46


def _str_regs(text: str) -> tuple[int, ...]:
    raw = text.encode().ljust(12, b"\0")
    return tuple(int.from_bytes(raw[i:i + 4], "little") for i in range(0, 12, 4))


def build_cpuid_table(isolation: int, max_vps: int) -> np.ndarray:
    genu, ntel, inei = _str_regs("GenuineIntel")
    micr, osof, t_hv = _str_regs("Microsoft Hv")
    # Leaf 1: family 6 model 0x55; ECX: SSE3, SSSE3, CX16, SSE4.1/4.2, x2APIC (21), POPCNT,
    # XSAVE, OSXSAVE-capable, hypervisor present (31). EDX: FPU..SSE2 basics with APIC (9).
    leaf1_ecx = (1 << 0) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 21) | (1 << 23) | (1 << 26) | (1 << 31)
    leaf1_edx = 0x178BFBFF
    hv_features_ebx = (1 << 16) | (1 << 17) | (1 << 21)  # AccessVsm, AccessVpRegisters, StartVirtualProcessor
    if isolation == ISOLATION_VBS:
        hv_features_ebx |= 1 << 22  # Isolation
    rows = [
        (0x0, ANY_SUBLEAF, MAX_BASIC_LEAF, genu, inei, ntel),
        (0x1, ANY_SUBLEAF, 0x00050654, 0x00010800, leaf1_ecx, leaf1_edx),
        (0x7, 0, 0, 0, 0, 0),
        (0xB, 0, 1, 1, 0x100, 0),        # SMT level: 1 thread per core
        (0xB, 1, 0, 0, 0x201, 0),        # core level; x2APIC id in EDX (patched per VP)
        (0x1F, 0, 1, 1, 0x100, 0),
        (0x1F, 1, 0, 0, 0x201, 0),
        (0x80000000, ANY_SUBLEAF, 0x80000008, 0, 0, 0),
        (0x80000001, ANY_SUBLEAF, 0, 0, 1, (1 << 11) | (1 << 20) | (1 << 29)),  # SYSCALL, NX, LM
        (0x80000008, ANY_SUBLEAF, 0x3000 | PHYSICAL_ADDRESS_BITS, 0, 0, 0),
        (L.VendorAndMaxFunctions, ANY_SUBLEAF, MAX_HV_LEAF, micr, osof, t_hv),
        (L.Interface, ANY_SUBLEAF, 0x31237648, 0, 0, 0),                 # "Hv#1"
        (L.Version, ANY_SUBLEAF, 26100, (10 << 16) | 0, 0, 0),
        (L.Features, ANY_SUBLEAF, 0x27E, hv_features_ebx, 0, (1 << 19)),
        (L.EnlightenmentInfo, ANY_SUBLEAF, (1 << 5) | (1 << 19), 0xFFFFFFFF, PHYSICAL_ADDRESS_BITS, 0),
        (L.ImplementationLimits, ANY_SUBLEAF, max_vps, max_vps, 0, 0),
        (L.HardwareFeatures, ANY_SUBLEAF, (1 << 3) | (1 << 24), 0, 0, 0),
        (L.IsolationConfiguration, ANY_SUBLEAF, 1, isolation & 0xF, 0, 0),  # paravisor present
    ]
    if isolation != ISOLATION_NONE:
        assert 0 <= isolation <= 3
    return np.array(rows, dtype=np.int64)


@njit(cache=True)
def cpuid_lookup(table, leaf, subleaf, apic_id):
    """(eax, ebx, ecx, edx) for leaf/subleaf on the VP with apic_id; zeros for unknown leaves."""
    eax = ebx = ecx = edx = np.int64(0)
    for i in range(table.shape[0]):
        if table[i, 0] == leaf and (table[i, 1] == -1 or table[i, 1] == subleaf):
            eax = table[i, 2]
            ebx = table[i, 3]
            ecx = table[i, 4]
            edx = table[i, 5]
            break
    if leaf == 1:
        ebx = (ebx & 0x00FFFFFF) | ((apic_id & 0xFF) << 24)
    elif leaf == 0xB or leaf == 0x1F:
        edx = apic_id
    return eax, ebx, ecx, edx
