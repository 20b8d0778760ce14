"""The engine on hand-assembled guest code: native I/O and CPUID hooks, slow-path I/O, MSR exit
addresses, hypercalls through the hypercall page, HLT, faults and instruction counting."""
import struct

import numpy as np
import pytest

from hclsim.boot.image import plan_layout, write_page_tables
from hclsim.cpu import engine as eng
from hclsim.cpu.cpuid import build_cpuid_table
from hclsim.defs.platform import Region
from hclsim.devices.bus import Bus
from hclsim.devices.uart16550 import Uart16550
from hclsim.hv.hypervisor import Hypervisor
from hclsim.cpu.memory import GuestMemory
from hclsim.cpu.exit_sites import find_msr_sites

from .asmutil import assemble

BASE = 0x8000000
CODE = BASE + 0x400000
GDT = BASE + 0x3F0000


@pytest.fixture
def machine():
    mem = GuestMemory(256 << 20)
    lay = plan_layout(BASE, 64 << 20, 0x1000, 0x200000, 0x1000, 0)
    cr3 = write_page_tables(mem, lay)
    for i, e in enumerate((0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)):
        mem.write_u64(GDT + 8 * i, e)
    ports = []
    hv = Hypervisor(mem, [0, 1, 2, 3])
    out = {}

    class PortRecorder:   # a device on port 0x80 that records what reaches it through Python
        name, pio_regions = "recorder", (Region("port", 0x80, 1),)

        def pio_read(self, port, size):
            ports.append((port, size, 0, True))
            return 0x5A

        def pio_write(self, port, size, value):
            ports.append((port, size, value, False))

    e = eng.Engine(mem, build_cpuid_table(0, 4), io_handler=None, hypercall_handler=lambda en: hv.hypercall(en, 0))
    bus = Bus("test")
    bus.add(Uart16550("COM3", 0x3E8, sink=lambda name, d: out.setdefault(0, bytearray()).extend(d)))
    bus.add(PortRecorder())
    bus.attach(e)
    from unicorn import x86_const as x86
    e.uc.reg_write(x86.UC_X86_REG_GDTR, (0, GDT, 0x1F, 0))
    e.set_reg("cr3", cr3)
    e.set_reg("cr4", 0x40060)
    e.set_msr(eng.MSR_EFER, 0xD00)
    e.set_reg("cr0", 0x80000021)
    for seg in ("cs",):
        e.set_reg(seg, 0x10)
    for seg in ("ds", "ss", "es"):
        e.set_reg(seg, 0x18)
    e.set_reg("rsp", CODE + 0x10000)
    yield mem, e, hv, ports, out
    e.close()


def load(mem, e, source):
    code = assemble(source)
    mem.write(CODE, code)
    sites = find_msr_sites(code, CODE)
    e.set_exits(sites)
    e.set_reg("rip", CODE)
    return code, sites


def test_uart_natively_and_other_ports_through_python(machine):
    mem, e, hv, ports, out = machine
    load(mem, e, """
        mov ecx, 300
    1:  mov dx, 0x3e8
        mov al, 'x'
        out dx, al
        mov dx, 0x3ed
        in al, dx
        dec ecx
        jnz 1b
        mov dx, 0x80
        in al, dx
        mov bl, al
        out dx, al
        hlt
    """)
    exit = e.run()
    assert exit.kind == eng.EXIT_HLT
    assert out[0] == b"x" * 300
    assert ports == [(0x80, 1, 0, True), (0x80, 1, 0x5A, False)]
    c = e.counters()
    assert c["io_fast_exits"] == 600 and c["io_slow_exits"] == 2
    # 1 + 300 * 7 (loop body) + 5 (mov dx; in; mov bl; out; hlt) instructions
    assert c["instructions"] == 1 + 300 * 7 + 5


def test_cpuid_msr_exit_and_hypercall(machine):
    mem, e, hv, ports, out = machine
    page = CODE + 0x2000
    code, sites = load(mem, e, f"""
        mov eax, 0x40000000
        cpuid
        mov r12, rbx
        mov ecx, 0x40000001
        mov eax, {page | 1}
        xor edx, edx
        wrmsr
        mov rcx, (1 << 32) | 0x9a
        mov rdx, {CODE + 0x3000}
        mov r8, {CODE + 0x3800}
        mov rax, {page}
        call rax
        hlt
    """)
    assert sorted(sites.values()) == ["wrmsr"]
    mem.write(CODE + 0x3000, struct.pack("<QB7xI", 2**64 - 1, 0, 3))  # apic id 3
    e.set_exits(set(sites))
    exit = e.run()
    assert exit.kind == eng.EXIT_ADDRESS and exit.rip in sites
    hv.msr_exit(e, 0, sites[exit.rip])
    assert hv.hypercall_msr == page | 1
    assert mem.read(page, 4) == b"\x0f\x01\xc1\xc3"
    exit = e.run()
    assert exit.kind == eng.EXIT_HLT
    assert e.reg("r12") == 0x7263694D
    assert e.reg("rax") == 1 << 32  # success, 1 rep completed
    assert mem.read_u32(CODE + 0x3800) == 3
    assert hv.hypercall_log == [(0, 0x9A, 0)]


def test_unmapped_access_is_a_fault(machine):
    mem, e, *_ = machine
    load(mem, e, "mov rax, 0x7f0000000000\n mov rbx, [rax]\n hlt")
    exit = e.run()
    assert exit.kind == eng.EXIT_FAULT
    assert exit.rip == CODE + 10
    assert "unmapped" in exit.message or exit.vector is not None


def test_bad_hypercall_code_and_alignment(machine):
    mem, e, hv, *_ = machine
    page = CODE + 0x2000
    hv.wrmsr(e, 0, 0x40000001, page | 1)
    load(mem, e, f"""
        mov rcx, 0x7777
        mov rax, {page}
        call rax
        mov r12, rax
        mov rcx, (1 << 32) | 0x9a
        mov rdx, {CODE + 0x3004}
        xor r8, r8
        mov rax, {page}
        call rax
        hlt
    """)
    assert e.run().kind == eng.EXIT_HLT
    assert e.reg("r12") == 0x0002
    assert e.reg("rax") == 0x0004


def test_deterministic_instruction_counts(machine):
    mem, e, *_ = machine
    src = "mov ecx, 1000\n1: add rax, rcx\n dec ecx\n jnz 1b\n hlt"
    load(mem, e, src)
    e.run()
    first = e.counters()["instructions"]
    assert first == 1 + 3 * 1000 + 1
    e.set_reg("rip", CODE)
    e.run()
    assert e.counters()["instructions"] == 2 * first


def test_rep_string_counts_as_one_instruction(machine):
    mem, e, *_ = machine
    load(mem, e, f"mov rdi, {CODE + 0x8000}\n mov ecx, 500\n xor eax, eax\n rep stosb\n"
                 f" mov ecx, 3\n rep stosq\n hlt")
    assert e.run().kind == eng.EXIT_HLT
    assert e.counters()["instructions"] == 7
    assert e.reg("rdi") == CODE + 0x8000 + 500 + 24


def test_mmio_accesses_reach_the_device(machine):
    mem, e, *_ = machine
    seen = []
    regs = {0x10: 0xCAFE}
    # identity-map the 2 MiB page holding the MMIO range (a PD for the 4th GiB)
    pml4 = e.reg("cr3")
    pdpt = mem.read_u64(pml4) & ~0xFFF
    pd = CODE + 0x20000
    mem.write_u64(pdpt + 3 * 8, pd | 3)
    mem.write_u64(pd + ((0xFED40000 >> 21) & 511) * 8, (0xFED40000 & ~0x1FFFFF) | 0x83)
    e.map_mmio(0xFED40000, 0x1000, read=lambda off, size: regs.get(off, 0xFFFFFFFF),
               write=lambda off, size, value: seen.append((off, size, value)))
    load(mem, e, "mov rax, 0xfed40000\n mov ebx, [rax + 0x10]\n mov dword ptr [rax + 4], 0x1234\n"
                 " mov ecx, [rax + 8]\n hlt")
    assert e.run().kind == eng.EXIT_HLT
    assert e.reg("rbx") == 0xCAFE and e.reg("rcx") == 0xFFFFFFFF
    assert seen == [(4, 4, 0x1234)]


def test_vps_are_contexts_multiplexed_on_one_engine(machine):
    from hclsim.hv.vp import Vp, long_mode_context
    mem, e, *_ = machine
    load(mem, e, "1: mov eax, 0x0b\n mov ecx, 1\n cpuid\n add r12, rdx\n add r13, 1\n hlt\n jmp 1b")
    ctx = long_mode_context(rip=CODE, rsp=CODE + 0x10000, cr3=e.reg("cr3"), gdt=(GDT, 0x1F), cr0=0x80000021,
                            cr4=0x40060, efer=0xD00, cs=0x10, ds=0x18)
    vps = [Vp(i, 10 + i) for i in range(3)]
    for vp in vps:
        vp.set_long_mode(e, ctx)
    for _round in range(2):
        for vp in vps:
            vp.load(e)
            assert e.run().kind == eng.EXIT_HLT
            vp.save(e)
    for vp in vps:
        vp.load(e)
        assert e.reg("r13") == 2 and e.reg("r12") == 2 * vp.apic_id  # CPUID 0xB: its own x2APIC id


def test_vp_switch_does_not_keep_the_previous_vps_translations(machine):
    """Two VPs map one VA to different pages (as the sidecar's per-CPU window does): each must
    read its own page, though Unicorn's context restore keeps the TLB."""
    from hclsim.hv.vp import Vp
    mem, e, hv, ports, out = machine
    va = 0x7F00000000   # PML4 slot 0, PDPT slot 508: not in the image's tables
    load(mem, e, f"movabs rax, [{va:#x}]\nhlt")
    base_cr3 = e.reg("cr3")
    vps = []
    for i, (page, value) in enumerate(((0x400000, 0xAAAA), (0x600000, 0xBBBB))):
        tables = 0x300000 + i * 0x3000   # a PML4 copy whose slot 0 gets its own PDPT/PD
        mem.write(tables, mem.read(base_cr3 & ~0xFFF, 0x1000))
        pdpt, pd = tables + 0x1000, tables + 0x2000
        mem.write(pdpt, mem.read(mem.read_u64(tables) & 0x000FFFFFFFFFF000, 0x1000))
        mem.write_u64(tables, pdpt | 3)
        mem.write_u64(pdpt + 508 * 8, pd | 3)
        mem.write_u64(pd, page | 0x83 | (1 << 63))
        mem.write_u64(page, value)
        e.set_reg("cr3", tables)
        e.set_reg("rip", CODE)
        assert e.translate(va) == page
        vp = Vp(i, i)
        vp.save(e)
        vps.append((vp, value))
    for vp, value in vps * 2:
        vp.load(e)
        exit = e.run()
        assert exit.kind == eng.EXIT_HLT, exit
        assert e.reg("rax") == value


def test_silent_faults_of_cache_invalidation_do_not_escalate_guest_faults(machine):
    """Unicorn drops translations by virtual address through the loaded page tables (for
    ctl_remove_cache, hook_del of a translated hook, every exit address after every run); on an
    unmapped one it raises a #PF nobody sees, which QEMU remembers as in flight. Two of them made
    the guest's next exception a triple fault: emu_start returned without the interrupt hook."""
    mem, e, *_ = machine
    load(mem, e, "mov rax, 0x800000000000\n mov rbx, [rax]\n hlt")  # non-canonical: #GP
    for _ in range(3):
        for _ in range(2):
            e.uc.ctl_remove_cache(0x7F0000000000, 0x7F0000000001)  # not mapped here
        e.set_reg("rip", CODE)
        exit = e.run()
        assert (exit.kind, exit.vector, exit.rip) == (eng.EXIT_FAULT, 13, CODE + 10)


# ---- the block-count cache (cpu/fastpath.py) under more blocks than it has slots ------------

SMALL_TABLE = 1 << 10            # slots: 128 buckets of 8 ways


@pytest.fixture
def small_table_machine(monkeypatch, request):
    """The machine fixture on an engine whose block-count cache has SMALL_TABLE slots."""
    from hclsim.cpu import fastpath
    monkeypatch.setattr(fastpath, "BLOCK_TABLE_SIZE", SMALL_TABLE)
    mem, e, *rest = request.getfixturevalue("machine")
    assert e.state.block_table.shape == (SMALL_TABLE, 2)
    return (mem, e, *rest)


def load_chain(mem, e, blocks: int) -> None:
    """`blocks` distinct blocks of (inc rax; jmp next), then dec rcx; jnz to the first; hlt."""
    block = assemble("inc rax\n jmp 1f\n1:")
    body = block * blocks
    tail = assemble("dec rcx") + b"\x0f\x85" + (-(len(body) + 9) & 0xFFFFFFFF).to_bytes(4, "little") + assemble("hlt")
    mem.write(CODE, body + tail)


def run_chain(e, passes: int) -> dict:
    """Run the chain `passes` times; the counters' increase (and the cache's statistics)."""
    before = dict(e.counters(), **{"bt_" + k: v for k, v in e.state.block_cache_stats().items()})
    e.set_reg("rip", CODE)
    e.set_reg("rcx", passes)
    assert e.run().kind == eng.EXIT_HLT
    after = dict(e.counters(), **{"bt_" + k: v for k, v in e.state.block_cache_stats().items()})
    return {k: after[k] - before[k] for k in after}


def chain_instructions(blocks: int, passes: int) -> int:
    return passes * (2 * blocks + 2) + 1          # (inc, jmp) per block, dec + jnz per pass; hlt


@pytest.mark.parametrize("blocks", [3 * SMALL_TABLE, 12 * SMALL_TABLE])
def test_block_cache_bounded_with_more_blocks_than_slots(small_table_machine, blocks):
    """Exact instruction counts however many blocks ran; a lookup examines at most `ways` slots
    (the miss costs the same at 3 and 12 times the table's slots); misses bounded by blocks."""
    from hclsim.cpu import fastpath
    mem, e, *_ = small_table_machine
    ways = fastpath.BLOCK_TABLE_WAYS
    load_chain(mem, e, blocks)
    first = run_chain(e, 1)
    assert first["instructions"] == chain_instructions(blocks, 1)
    distinct = blocks + 2                             # the chain, dec/jnz, hlt
    assert first["blocks"] == first["block_count_misses"] == distinct
    assert first["bt_probes"] <= ways * first["blocks"]
    stats = e.state.block_cache_stats()
    assert stats["entries"] == SMALL_TABLE            # full, every bucket
    assert stats["evictions"] == distinct - SMALL_TABLE
    assert not e.state.holds_every_block
    second = run_chain(e, 1)
    assert second["instructions"] == chain_instructions(blocks, 1)
    # A cyclic pass over more blocks than the cache holds misses each block (FIFO) at most once.
    assert second["block_count_misses"] <= second["blocks"] == distinct
    assert second["bt_probes"] <= ways * second["blocks"]
    assert second["bt_evictions"] == second["block_count_misses"]
    several = run_chain(e, 3)
    assert several["instructions"] == chain_instructions(blocks, 3)
    assert several["bt_probes"] <= ways * several["blocks"]
    e.state.forget_blocks()
    assert e.state.holds_every_block and not e.state.block_table.any()


def test_block_cache_keeps_a_working_set_that_fits(small_table_machine):
    mem, e, *_ = small_table_machine
    blocks = SMALL_TABLE // 8
    load_chain(mem, e, blocks)
    assert run_chain(e, 1)["block_count_misses"] == blocks + 2
    assert e.state.block_cache_stats()["evictions"] == 0 and e.state.holds_every_block
    again = run_chain(e, 5)
    assert again["instructions"] == chain_instructions(blocks, 5)
    assert again["block_count_misses"] == 0


def test_block_cache_eviction_is_deterministic(small_table_machine):
    """The same guest run twice from an empty cache: the same misses, evictions and probes."""
    mem, e, *_ = small_table_machine
    blocks = 5 * SMALL_TABLE // 2
    load_chain(mem, e, blocks)
    runs = []
    for _ in range(2):
        e.uc.ctl_flush_tb()
        e.state.forget_blocks()
        runs.append([run_chain(e, passes) for passes in (1, 2, 1)])
    assert runs[0] == runs[1]
    assert runs[0][0]["bt_evictions"] > 0
    assert [r["instructions"] for r in runs[0]] == [chain_instructions(blocks, p) for p in (1, 2, 1)]


def test_block_cache_recounts_rewritten_code_after_evictions(small_table_machine):
    """invalidate_blocks on the set-associative table: a rewritten block (same address and size,
    other instructions) is counted anew, with the cache full and evicting."""
    mem, e, *_ = small_table_machine
    blocks = 2 * SMALL_TABLE
    load_chain(mem, e, blocks)
    run_chain(e, 2)
    last = CODE + 5 * (blocks - 1)
    table = e.state.block_table
    (row,) = np.flatnonzero(table[:, 0] == ((last + 1) ^ (5 << 48)))   # still cached: its bucket's newest
    assert table[row, 1] == 2
    mem.write(last, assemble("nop\n nop\n nop\n jmp 1f\n1:"))   # 4 instructions, 5 bytes again
    e.code_changed(last, last + 5)
    assert table[row, 1] == -1
    assert run_chain(e, 1)["instructions"] == chain_instructions(blocks, 1) + 2
    (row,) = np.flatnonzero(table[:, 0] == ((last + 1) ^ (5 << 48)))   # (inserts move entries in a bucket)
    assert table[row, 1] == 4
