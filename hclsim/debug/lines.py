"""DWARF line tables of a firmware ELF (pyelftools): image offset -> (source file, line) and
(file, line) -> image offsets. Read once per ELF and kept as sorted arrays, so a lookup is a
bisect (the prompt shows a source line on every stop)."""
import bisect
import functools
import os

from elftools.common.exceptions import ELFError

from hclsim.debug.dwarf import dwarf_info


class LineTable:
    """Rows (image offset, file index, line) of every line-program sequence; an end-of-sequence
    row has line 0 (addresses from there up to the next sequence have no line)."""

    def __init__(self, files: list[str], rows: list[tuple[int, int, int]]):
        rows.sort(key=lambda r: (r[0], r[2] != 0))   # at a shared address the sequence end goes first
        self.files = files
        self.offsets = [r[0] for r in rows]
        self.rows = rows

    def line_at(self, offset: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self.offsets, offset) - 1
        if i < 0 or self.rows[i][2] == 0:
            return None
        return self.files[self.rows[i][1]], self.rows[i][2]

    def span_at(self, offset: int) -> tuple[str, int, int, int] | None:
        """(file, line, first offset, end offset) of the line-table row holding offset."""
        i = bisect.bisect_right(self.offsets, offset) - 1
        if i < 0 or self.rows[i][2] == 0:
            return None
        end = next((o for o in self.offsets[i + 1:] if o > self.offsets[i]), self.offsets[i] + 1)
        return self.files[self.rows[i][1]], self.rows[i][2], self.offsets[i], end

    def matching_files(self, name: str) -> list[int]:
        """Indexes of the files whose path is name or ends with /name."""
        name = name.lstrip("./")
        return [i for i, f in enumerate(self.files) if f == name or f.endswith("/" + name)]

    def offsets_of(self, file_indexes: list[int], line: int) -> tuple[int, list[int]]:
        """(line, offsets) of the first line >= line that has code in those files (as gdb moves
        a breakpoint on a line without code to the next one)."""
        wanted = set(file_indexes)
        best, found = None, []
        for off, f, ln in self.rows:
            if f not in wanted or ln < line or ln == 0:
                continue
            if best is None or ln < best:
                best, found = ln, [off]
            elif ln == best:
                found.append(off)
        return best or 0, sorted(set(found))


def _file_names(header, comp_dir: str) -> list[str]:
    dirs = [d.decode(errors="replace") if isinstance(d, bytes) else d for d in header["include_directory"]]
    names = []
    for fe in header["file_entry"]:
        name = fe.name.decode(errors="replace") if isinstance(fe.name, bytes) else fe.name
        if header["version"] >= 5:
            directory = dirs[fe.dir_index] if fe.dir_index < len(dirs) else ""
        else:
            directory = comp_dir if fe.dir_index == 0 else dirs[fe.dir_index - 1]
        names.append(os.path.normpath(os.path.join(comp_dir, directory, name)))
    return names


@functools.lru_cache(maxsize=16)
def line_table(path: str) -> LineTable | None:
    """The line table of the ELF at path, or None if it has no DWARF line information."""
    files, index, rows = [], {}, []
    try:
        dwarf = dwarf_info(path)
        if dwarf is None:
            return None
        for cu in dwarf.iter_CUs():
            program = dwarf.line_program_for_CU(cu)
            if program is None:
                continue
            comp_dir = cu.get_top_DIE().attributes.get("DW_AT_comp_dir")
            comp_dir = comp_dir.value.decode(errors="replace") if comp_dir else ""
            names = _file_names(program.header, comp_dir)
            base = 0 if program.header["version"] >= 5 else 1   # DWARF < 5 numbers files from 1
            for entry in program.get_entries():
                state = entry.state
                if state is None:
                    continue
                if state.end_sequence:
                    rows.append((state.address, 0, 0))
                    continue
                if not state.is_stmt or not 0 <= state.file - base < len(names):
                    continue
                name = names[state.file - base]
                if name not in index:
                    index[name] = len(files)
                    files.append(name)
                rows.append((state.address, index[name], state.line))
    except (OSError, ELFError, KeyError, ValueError, IndexError):
        return None
    return LineTable(files, rows) if rows else None
