"""A symbol file for gdb: an ELF64 with no code, only the kernel's text symbols (from its
kallsyms, debug/kallsyms.py) over a NOBITS .text at their link addresses, as vmlinux-to-elf makes
one. The gdb stub offers it as a shared library with its segment at the text's base, so gdb
loads the names by itself (`break start_kernel`, `bt` with names).

Layout: the ELF header, one PT_LOAD program header (the text's span, no file bytes), the string
and symbol tables, then the section headers (null, .text, .symtab, .strtab, .shstrtab).
"""
import struct

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")     # Elf64_Ehdr, 64 bytes
PHDR = struct.Struct("<IIQQQQQQ")             # Elf64_Phdr, 56 bytes
SHDR = struct.Struct("<IIQQQQIIQQ")           # Elf64_Shdr, 64 bytes
SYM = struct.Struct("<IBBHQQ")                # Elf64_Sym, 24 bytes
ET_EXEC, EM_X86_64, PT_LOAD, PF_X, PF_R = 2, 62, 1, 1, 4
SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_NOBITS = 1, 2, 3, 8
SHF_ALLOC, SHF_EXECINSTR = 2, 4
STB_GLOBAL, STT_FUNC = 1, 2


def symbol_elf(base: int, span: int, symbols) -> bytes:
    """The ELF bytes for symbols [(offset from base, size, name)] in [base, base + span)."""
    strtab = bytearray(b"\0")
    syms = [SYM.pack(0, 0, 0, 0, 0, 0)]
    for offset, size, name in symbols:
        syms.append(SYM.pack(len(strtab), (STB_GLOBAL << 4) | STT_FUNC, 0, 1, base + offset, size))
        strtab += name.encode("latin-1") + b"\0"
    shstrtab = b"\0.text\0.symtab\0.strtab\0.shstrtab\0"
    symtab = b"".join(syms)
    at = EHDR.size + PHDR.size
    sym_at = (at + len(strtab) + 7) & ~7
    shstr_at = sym_at + len(symtab)
    sh_at = (shstr_at + len(shstrtab) + 7) & ~7
    shdrs = [SHDR.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
             SHDR.pack(1, SHT_NOBITS, SHF_ALLOC | SHF_EXECINSTR, base, at, span, 0, 0, 16, 0),
             SHDR.pack(7, SHT_SYMTAB, 0, 0, sym_at, len(symtab), 3, 1, 8, SYM.size),
             SHDR.pack(15, SHT_STRTAB, 0, 0, at, len(strtab), 0, 0, 1, 0),
             SHDR.pack(23, SHT_STRTAB, 0, 0, shstr_at, len(shstrtab), 0, 0, 1, 0)]
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    out = bytearray(EHDR.pack(ident, ET_EXEC, EM_X86_64, 1, base, EHDR.size, sh_at, 0, EHDR.size,
                              PHDR.size, 1, SHDR.size, len(shdrs), 4))
    out += PHDR.pack(PT_LOAD, PF_R | PF_X, at, base, base, 0, span, 0x1000)
    out += strtab
    out += bytes(sym_at - len(out)) + symtab + shstrtab
    out += bytes(sh_at - len(out)) + b"".join(shdrs)
    return bytes(out)
