"""cpu/mmio_emulate.py against a real CPU emulator: each instruction form, assembled with GNU as
(or hand-encoded), runs once in a bare Unicorn with an MMIO region mapped (uc.mmio_map); the
registers it leaves and the bytes it stores must be what decode + complete_read / store_value say.
Unicorn splits an 8-byte MMIO access into 4-byte ones, so the oracle's device is a byte array and
every callback is one piece of it."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn import x86_const as ux

from hclsim.cpu.mmio_emulate import MmioAccess, MmioEmulationError, complete_read, decode, store_value
from tests.asmutil import assemble

CODE, MMIO, PAGE = 0x1000, 0x10000000, 0x1000
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
UC_REGS = {name: getattr(ux, f"UC_X86_REG_{name.upper()}") for name in GPRS}
LEGACY = GPRS[:8]
BY_WIDTH = {
    1: ("al", "cl", "dl", "bl", "spl", "bpl", "sil", "dil", *(f"r{n}b" for n in range(8, 16)), "ah", "ch", "dh", "bh"),
    2: ("ax", "cx", "dx", "bx", "sp", "bp", "si", "di", *(f"r{n}w" for n in range(8, 16))),
    4: ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", *(f"r{n}d" for n in range(8, 16))),
    8: GPRS,
}
HIGH_BYTE = ("ah", "ch", "dh", "bh")
PTR = {1: "byte", 2: "word", 4: "dword", 8: "qword"}
FS_BASE, GS_BASE = 0x0C000000, 0x06001000  # below MMIO, so 32-bit addressing reaches it too
REGS = {name: 0x0123456789ABCDEF ^ (0x1111111111111111 * i) for i, name in enumerate(GPRS)}
DEVICE = bytes((0x80 + 37 * i) & 0xFF for i in range(PAGE))  # every byte different from its neighbours


class Oracle:
    """One instruction on Unicorn: code at CODE, the MMIO page at MMIO backed by a byte array."""

    def __init__(self, device: bytes = DEVICE):
        self.device = bytearray(device)
        self.read_bytes, self.written_bytes = set(), set()

    def _read(self, uc, offset, size, user_data):
        self.read_bytes.update(range(offset, offset + size))
        return int.from_bytes(self.device[offset:offset + size], "little")

    def _write(self, uc, offset, size, value, user_data):
        self.written_bytes.update(range(offset, offset + size))
        self.device[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def run(self, code: bytes, regs: dict, fs_base: int = 0, gs_base: int = 0) -> dict:
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(CODE, PAGE)
        uc.mem_write(CODE, code)
        uc.mmio_map(MMIO, PAGE, self._read, None, self._write, None)
        for name, value in regs.items():
            uc.reg_write(UC_REGS[name], value)
        uc.reg_write(ux.UC_X86_REG_FS_BASE, fs_base)
        uc.reg_write(ux.UC_X86_REG_GS_BASE, gs_base)
        uc.emu_start(CODE, CODE + len(code), count=1)
        self.rip = uc.reg_read(ux.UC_X86_REG_RIP)
        return {name: uc.reg_read(UC_REGS[name]) for name in GPRS}


def check(code: bytes, regs: dict, offset: int, **bases) -> MmioAccess:
    """Run code on the oracle (its memory operand must reach MMIO + offset with regs) and compare."""
    access = decode(code, CODE)
    oracle = Oracle()
    after = oracle.run(code, regs, **bases)
    assert oracle.rip == CODE + access.length == CODE + len(code)
    touched = set(range(offset, offset + access.size))
    if access.write:
        assert oracle.written_bytes == touched, access.text
        stored = int.from_bytes(oracle.device[offset:offset + access.size], "little")
        assert stored == store_value(access, regs), access.text
        assert after == regs, access.text  # a store changes no register
        end = offset + access.size
        assert oracle.device[:offset] == DEVICE[:offset] and oracle.device[end:] == DEVICE[end:]
    else:
        assert touched <= oracle.read_bytes and not oracle.written_bytes, access.text
        value = int.from_bytes(DEVICE[offset:offset + access.size], "little")
        expected = {**regs, **complete_read(access, value, regs)}
        assert after == expected, access.text
    return access


def _fit(regs: dict, offset: int, base=None, index=None, scale=1, disp=0, addr32=False, seg_base=0) -> dict:
    """regs with base chosen so [base + index*scale + disp] (+ segment base) is MMIO + offset
    (with no base, the index is chosen)."""
    regs = dict(regs)
    target = MMIO + offset - seg_base - disp
    if base is None:
        assert target % scale == 0
        regs[index] = target // scale
        return regs
    if index is not None:
        target -= regs[index] * scale
    if addr32:
        regs[base] = (regs[base] & ~0xFFFFFFFF) | (target & 0xFFFFFFFF)  # the upper half is ignored
    else:
        regs[base] = target & (2**64 - 1)
    return regs


# ---- hand-picked forms -------------------------------------------------------------------------
# (assembly, offset into the MMIO page, how the address registers are set: base, index, scale, disp)
FORMS = [
    ("mov eax, dword ptr [rax]", 0x10, dict(base="rax")),
    ("mov dword ptr [rax], edi", 0x14, dict(base="rax")),
    ("movzx ecx, byte ptr [rsi + 0x20]", 0x20, dict(base="rsi", disp=0x20)),
    ("movzx rcx, byte ptr [rsi + 0x20]", 0x21, dict(base="rsi", disp=0x20)),
    ("movzx ax, byte ptr [rbx]", 0x23, dict(base="rbx")),
    ("movzx r11d, word ptr [r12 - 0x80]", 0x40, dict(base="r12", disp=-0x80)),
    ("movsx rcx, word ptr [rsi + 0x22]", 0x22, dict(base="rsi", disp=0x22)),
    ("movsx edx, byte ptr [rsi]", 0x81, dict(base="rsi")),
    ("movsx di, byte ptr [rbp + 1]", 0x83, dict(base="rbp", disp=1)),
    ("movsxd rcx, dword ptr [rsi + 0x24]", 0x24, dict(base="rsi", disp=0x24)),
    ("movsxd r15, dword ptr [r13 + r14*4 + 0x1000]", 0x64, dict(base="r13", index="r14", scale=4, disp=0x1000)),
    ("movsxd eax, dword ptr [rbx]", 0x68, dict(base="rbx")),
    ("mov ch, byte ptr [rsi + 0x21]", 0x21, dict(base="rsi", disp=0x21)),
    ("mov ah, byte ptr [rax + rbx*2]", 0x31, dict(base="rax", index="rbx", scale=2)),
    ("mov byte ptr [rdi], dh", 0x32, dict(base="rdi")),
    ("mov bh, byte ptr [rdx]", 0x33, dict(base="rdx")),
    ("mov cx, word ptr [rsi + 0x28]", 0x28, dict(base="rsi", disp=0x28)),
    ("mov r9b, byte ptr [r10]", 0x35, dict(base="r10")),
    ("mov byte ptr [rdi + 0x2c], r9b", 0x2C, dict(base="rdi", disp=0x2C)),
    ("mov byte ptr [rax], sil", 0x36, dict(base="rax")),
    ("mov spl, byte ptr [rbx]", 0x37, dict(base="rbx")),
    ("mov rcx, qword ptr [rsi + r8*8 + 8]", 0x48, dict(base="rsi", index="r8", scale=8, disp=8)),
    ("mov qword ptr [rdi + rdx*8 + 0x10], r10", 0x50, dict(base="rdi", index="rdx", scale=8, disp=0x10)),
    ("mov r11, qword ptr [rsp + 0x100]", 0x58, dict(base="rsp", disp=0x100)),
    ("mov qword ptr [r12 + r13 + 0x7fffffff], rsp", 0x60, dict(base="r12", index="r13", disp=0x7FFFFFFF)),
    ("mov word ptr [rbp], r14w", 0x6A, dict(base="rbp")),
    ("mov dword ptr [r8 + r9*2 - 8], r15d", 0x6C, dict(base="r8", index="r9", scale=2, disp=-8)),
    ("mov rax, qword ptr [rcx*8 + 0x100]", 0x70, dict(index="rcx", scale=8, disp=0x100)),
    ("mov eax, dword ptr [ebx]", 0x74, dict(base="rbx", addr32=True)),
    ("movsxd rdx, dword ptr [ebx + 8]", 0xA4, dict(base="rbx", disp=8, addr32=True)),  # capstone needs help
    ("mov byte ptr [r8d + r9d*4 + 5], 0x7f", 0x78, dict(base="r8", index="r9", scale=4, disp=5, addr32=True)),
    # immediates: imm8/16/32, and imm32 sign-extended into an 8-byte store
    ("mov byte ptr [rsi], 0x80", 0x79, dict(base="rsi")),
    ("mov word ptr [rsi + 0x2a], 0x5aa5", 0x2A, dict(base="rsi", disp=0x2A)),
    ("mov dword ptr [rsi], 0xfedcba98", 0x7C, dict(base="rsi")),
    ("mov qword ptr [rsi + 0x18], -0x5a5a5a5b", 0x18, dict(base="rsi", disp=0x18)),
    ("mov qword ptr [rsi], 0x7fffffff", 0x80, dict(base="rsi")),
    ("mov qword ptr [r13 + r12*8], -1", 0x88, dict(base="r13", index="r12", scale=8)),
    # segment overrides (FS/GS bases are added; the data segments' are 0 in long mode)
    ("mov eax, dword ptr fs:[rbx + 4]", 0x90, dict(base="rbx", disp=4, seg_base=FS_BASE)),
    ("mov qword ptr gs:[rdi], r8", 0x98, dict(base="rdi", seg_base=GS_BASE)),
    ("mov al, byte ptr es:[rbx]", 0x9F, dict(base="rbx")),
    ("mov word ptr ds:[rbx], 0x1234", 0xA0, dict(base="rbx")),
]


@pytest.mark.parametrize("source,offset,address", FORMS, ids=[f[0] for f in FORMS])
def test_form_matches_unicorn(source, offset, address):
    bases = {}
    if address.get("seg_base"):
        bases["gs_base" if "gs:" in source else "fs_base"] = address["seg_base"]
    check(assemble(source), _fit(REGS, offset, **address), offset, **bases)


def _rip_relative(source: str, offset: int) -> bytes:
    """source with `{disp}` for a RIP-relative displacement that lands on MMIO + offset at CODE."""
    length = len(assemble(source.format(disp=0x12345678)))  # always disp32
    return assemble(source.format(disp=MMIO + offset - (CODE + length)))


@pytest.mark.parametrize("source,offset", [
    ("mov eax, dword ptr [rip + {disp}]", 0x100),
    ("movsx r10, byte ptr [rip + {disp}]", 0x105),
    ("mov qword ptr [rip + {disp}], -2", 0x108),       # disp32 and imm32 both after ModRM
    ("mov byte ptr [rip + {disp}], 0x42", 0x110),
    ("mov word ptr gs:[rip + {disp}], r9w", 0x112),
    ("movsxd rdx, dword ptr [rip + {disp}]", 0x114),
    ("mov byte ptr [rip + {disp}], ah", 0x118),
])
def test_rip_relative_matches_unicorn(source, offset):
    access = check(_rip_relative(source, offset), REGS, offset)
    assert "rip" in access.text


@pytest.mark.parametrize("source,offset", [
    ("movabs al, byte ptr [{addr}]", 0x120),
    ("movabs ax, word ptr [{addr}]", 0x122),
    ("movabs eax, dword ptr [{addr}]", 0x124),
    ("movabs rax, qword ptr [{addr}]", 0x128),
    ("movabs byte ptr [{addr}], al", 0x130),
    ("movabs qword ptr [{addr}], rax", 0x138),
    ("mov ecx, dword ptr [{addr}]", 0x140),             # ModRM + SIB with no base or index: disp32
    ("mov dword ptr [{addr}], 0x80000000", 0x144),
])
def test_absolute_addresses_match_unicorn(source, offset):
    check(assemble(source.format(addr=hex(MMIO + offset))), REGS, offset)


# Encodings GNU as would not pick: redundant and overriding prefixes.
@pytest.mark.parametrize("hex_bytes,offset", [
    ("66488b03", 0x150),   # 66 + REX.W: REX.W wins, 8 bytes
    ("408a03", 0x158),     # empty REX: mov al, [rbx]
    ("408a23", 0x159),     # empty REX turns ah into spl
    ("2e8b03", 0x15C),     # CS override (ignored in long mode)
    ("3e66c7033412", 0x160),  # DS override, imm16
    ("486303", 0x164),     # movsxd rax, [rbx]
    ("480fb603", 0x168),   # movzx rax, byte [rbx]
    ("4c8b1c03", 0x170),   # mov r11, [rbx + rax]
])
def test_hand_encoded_matches_unicorn(hex_bytes, offset):
    code = bytes.fromhex(hex_bytes)
    index = "rax" if hex_bytes == "4c8b1c03" else None
    check(code, _fit(REGS, offset, base="rbx", index=index), offset)


# ---- generated forms ---------------------------------------------------------------------------
@st.composite
def instructions(draw):
    """(assembly, registers, offset, segment bases): a mov/movzx/movsx/movsxd with a random data
    register or immediate, operand size and addressing form, and registers that make it reach MMIO."""
    kind = draw(st.sampled_from(["load", "store", "store_imm", "movzx", "movsx", "movsxd"]))
    if kind in ("load", "store"):
        size = draw(st.sampled_from([1, 2, 4, 8]))
        reg = draw(st.sampled_from(BY_WIDTH[size]))
        mem_size = size
    elif kind == "store_imm":
        size = mem_size = draw(st.sampled_from([1, 2, 4, 8]))
        reg = None
    elif kind == "movsxd":
        mem_size, size = 4, draw(st.sampled_from([4, 8]))
        reg = draw(st.sampled_from(BY_WIDTH[size]))
    else:
        mem_size = draw(st.sampled_from([1, 2]))
        size = draw(st.sampled_from([w for w in (2, 4, 8) if w > mem_size]))
        reg = draw(st.sampled_from(BY_WIDTH[size]))
    no_rex = reg in HIGH_BYTE
    pool = LEGACY if no_rex else GPRS
    addr32 = draw(st.booleans()) and draw(st.booleans())
    base = draw(st.sampled_from(pool))
    index = draw(st.one_of(st.none(), st.sampled_from([r for r in pool if r not in ("rsp", base)])))
    scale = draw(st.sampled_from([1, 2, 4, 8])) if index else 1
    disp = draw(st.one_of(st.just(0), st.integers(-128, 127), st.integers(-2**31, 2**31 - 1)))
    seg = draw(st.sampled_from(["", "", "fs", "gs", "ds", "es"]))
    offset = draw(st.integers(0, PAGE - mem_size))
    if draw(st.booleans()):
        offset -= offset % mem_size  # aligned, mostly
    regs = dict(zip(GPRS, draw(st.lists(st.integers(0, 2**64 - 1), min_size=16, max_size=16))))
    seg_base = {"fs": FS_BASE, "gs": GS_BASE}.get(seg, 0)

    def name(r):  # the address register as written: 32-bit with an address-size override
        return BY_WIDTH[4][GPRS.index(r)] if addr32 else r
    mem = " + ".join([name(base)] + ([f"{name(index)}*{scale}"] if index else []))
    if disp:
        mem += f" {'-' if disp < 0 else '+'} {abs(disp):#x}"
    mem = f"{PTR[mem_size]} ptr {seg + ':' if seg else ''}[{mem}]"
    if kind == "store_imm":
        lo, hi = {1: (-128, 255), 2: (-2**15, 2**16 - 1), 4: (-2**31, 2**32 - 1), 8: (-2**31, 2**31 - 1)}[size]
        source = f"mov {mem}, {draw(st.integers(lo, hi))}"
    elif kind == "store":
        source = f"mov {mem}, {reg}"
    else:
        source = f"{'mov' if kind == 'load' else kind} {reg}, {mem}"
    regs = _fit(regs, offset, base, index, scale, disp, addr32, seg_base)
    return source, regs, offset, {"fs_base": FS_BASE, "gs_base": GS_BASE}


@settings(derandomize=True, max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(instructions())
def test_generated_forms_match_unicorn(case):
    source, regs, offset, bases = case
    check(assemble(source), regs, offset, **bases)


@settings(derandomize=True, max_examples=200, deadline=None, database=None)
@given(st.sampled_from([1, 2, 4, 8]), st.sampled_from(["", "zero", "sign"]), st.integers(0, 2**64 - 1),
       st.integers(0, 2**64 - 1))
def test_complete_read_rules(size, extend, value, old):
    """The x86 rules, spelled out: AH..DH are bits 8-15, 8/16-bit destinations merge, 32-bit ones
    zero-extend, movzx/movsx extend from the access size."""
    v = value & ((1 << 8 * size) - 1)
    signed = v - (1 << 8 * size) if extend == "sign" and v >> (8 * size - 1) else v
    for reg, full, shift, width in (("ah", "rax", 8, 1), ("r9b", "r9", 0, 1), ("si", "rsi", 0, 2),
                                    ("r10d", "r10", 0, 4), ("rdi", "rdi", 0, 8)):
        valid = (extend == "" and width == size) or (extend != "" and size < width) or \
            (extend == "sign" and size == width == 4)  # movsxd r32, m32
        if not valid:
            continue
        access = MmioAccess("test", 3, False, size, reg, None, extend)
        result = complete_read(access, value, {full: old})[full]
        field = ((1 << 8 * width) - 1) << shift
        if width >= 4:
            assert result == signed & ((1 << 8 * width) - 1)
        else:
            assert result == (old & ~field) | ((signed << shift) & field)


# ---- what is not emulated ----------------------------------------------------------------------
@pytest.mark.parametrize("source,mnemonic", [
    ("add dword ptr [rax], eax", "add"),
    ("or byte ptr [rbx], 1", "or"),
    ("inc qword ptr [rax]", "inc"),
    ("xchg dword ptr [rax], ecx", "xchg"),
    ("lock cmpxchg dword ptr [rax], ecx", "cmpxchg"),
    ("movsb", "movsb"),
    ("rep stosd", "stosd"),
    ("push qword ptr [rax]", "push"),
    ("mov word ptr [rax], ds", "ds"),
    ("mov es, word ptr [rax]", "es"),
    ("movbe eax, dword ptr [rax]", "movbe"),
    ("movnti dword ptr [rax], eax", "movnti"),
    ("mov eax, ebx", "mov eax, ebx"),
    ("movabs rax, 0x1122334455667788", "movabs"),
])
def test_unsupported_instruction_is_an_error(source, mnemonic):
    with pytest.raises(MmioEmulationError, match=mnemonic):
        decode(assemble(source), CODE)


def test_undecodable_bytes_and_ambiguous_forms_are_errors():
    with pytest.raises(MmioEmulationError, match="does not decode"):
        decode(b"\x06", CODE)     # push es: invalid in 64-bit mode
    with pytest.raises(MmioEmulationError, match="does not decode"):
        decode(b"", CODE)
    with pytest.raises(MmioEmulationError, match="does not decode"):
        decode(b"\x67\x8b", CODE)  # truncated
    with pytest.raises(MmioEmulationError, match="16-bit destination"):
        decode(bytes.fromhex("666303"), CODE)   # movsxd ax, [rbx]: vendors differ on the size read


def test_register_not_given_is_an_error():
    """The sidecar's command page carries no RSP: an MMIO access through it cannot complete."""
    regs = {name: 0 for name in GPRS if name != "rsp"}
    with pytest.raises(MmioEmulationError, match="rsp"):
        store_value(decode(assemble("mov qword ptr [rax], rsp")), regs)
    with pytest.raises(MmioEmulationError, match="rsp"):
        complete_read(decode(assemble("mov esp, dword ptr [rax]")), 0, regs)
    with pytest.raises(MmioEmulationError, match="load"):
        store_value(decode(assemble("mov eax, dword ptr [rax]")), regs)
    with pytest.raises(MmioEmulationError, match="store"):
        complete_read(decode(assemble("mov dword ptr [rax], eax")), 0, regs)


def test_decode_describes_the_access():
    assert decode(assemble("movsx rcx, word ptr [rsi + 0x22]")) == MmioAccess(
        "movsx rcx, word ptr [rsi + 0x22]", 5, False, 2, "rcx", None, "sign")
    assert decode(assemble("mov qword ptr [rsi + 0x18], -0x5a5a5a5b")) == MmioAccess(
        "mov qword ptr [rsi + 0x18], 0xffffffffa5a5a5a5", 8, True, 8, None, 0xFFFFFFFFA5A5A5A5)
    assert decode(assemble("mov byte ptr [rdi], ch")).register_width == 1


# ---- the host's VP loop ------------------------------------------------------------------------
def _message(source: str, gpa: int, write: bool) -> dict:
    from hclsim.hv import intercepts
    code = assemble(source)
    return {"type": intercepts.MSG_UNMAPPED_GPA, "gpa": gpa, "rip": 0x200000, "instruction_length": len(code),
            "access": intercepts.ACCESS_WRITE if write else intercepts.ACCESS_READ,
            "instruction_bytes": code.ljust(16, b"\x90")}


def test_vp_loop_emulates_through_the_decoder():
    from hclsim.defs.platform import VTL0_MMIO_BASE, VTL0_MMIO_READ_PATTERN
    from hclsim.sidecar.vp_loop import emulate
    from hclsim.devices.vtl0_test import TestDevices
    devices = TestDevices()
    regs = {name: REGS[name] for name in GPRS}
    gpa = VTL0_MMIO_BASE + 0x21
    assert emulate(None, 0, devices, _message("mov ch, byte ptr [rsi + 0x21]", gpa, False), regs) == \
        {"rcx": (regs["rcx"] & ~0xFF00) | (((VTL0_MMIO_READ_PATTERN | 0x21) & 0xFF) << 8)}
    assert emulate(None, 0, devices, _message("movsxd rdx, dword ptr [rbx]", VTL0_MMIO_BASE + 4, False), regs) == \
        {"rdx": 0xFFFFFFFF00000000 | VTL0_MMIO_READ_PATTERN | 4}
    assert emulate(None, 0, devices, _message("mov byte ptr [rdi], r9b", gpa, True), regs) == {}
    assert emulate(None, 0, devices, _message("mov qword ptr [rdi], -2", gpa + 7, True), regs) == {}
    assert devices.mmio_writes == [(gpa, regs["r9"] & 0xFF), (gpa + 7, 2**64 - 2)]
    assert devices.mmio_accesses == [
        ("read", gpa, 1, 0x21), ("read", VTL0_MMIO_BASE + 4, 4, VTL0_MMIO_READ_PATTERN | 4),
        ("write", gpa, 1, regs["r9"] & 0xFF), ("write", gpa + 7, 8, 2**64 - 2)]
    with pytest.raises(MmioEmulationError, match="add"):
        emulate(None, 0, devices, _message("add dword ptr [rax], eax", gpa, True), regs)
    with pytest.raises(MmioEmulationError, match="message"):
        emulate(None, 0, devices, _message("mov dword ptr [rax], eax", gpa, False), regs)  # says read, is a store
