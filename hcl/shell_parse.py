"""sh's words and grammar (hcl/shell.py runs what this parses): quoting, expansions, lists,
pipelines and redirections."""


# ---- sh -----------------------------------------------------------------------------------
class ShellSyntax(Exception):
    pass


class Incomplete(ShellSyntax):
    """The text ends inside a quote, after a backslash or after && || |: more lines needed."""


class ShellExit(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


_OPERATORS = ("&&", "||", ">>", ">&", "<&", "<<", ";;", ";", "|", "&", "<", ">", "(", ")", "\n")
_REDIRECTS = (">", ">>", "<", ">&", "<&", "<<")
_RESERVED = frozenset("if then else elif fi do done case esac while until for select function { } [[ ]]".split())
_WORD_STOP = " \t\\'\"$`;&|<>()\n"
_SPECIAL_PARAMS = "?$#@*!-"


def _identifier(name: str) -> bool:
    return name.isascii() and name.isidentifier()


class _Lexer:
    """Shell words as parts: ("lit", text, quoted) and ("param", name, quoted); operators; io
    numbers (the 2 of 2>file)."""

    def __init__(self, src: str):
        self.src, self.tokens, self.parts = src, [], None

    def lit(self, text: str, quoted: bool) -> None:
        if self.parts is None:
            self.parts = []
        last = self.parts[-1] if self.parts else None
        if last is not None and last[0] == "lit" and last[2] == quoted:
            self.parts[-1] = ("lit", last[1] + text, quoted)
        else:
            self.parts.append(("lit", text, quoted))

    def end(self) -> None:
        if self.parts is not None:
            self.tokens.append(("word", self.parts))
            self.parts = None

    def param(self, i: int, quoted: bool) -> int:
        """$NAME ${NAME} $? $$ $# $@ $* $! $- $0-$9 at src[i] ('$'); a lone '$' is literal."""
        src = self.src
        nxt = src[i + 1:i + 2]
        if nxt == "{":
            j = src.find("}", i + 2)
            if j < 0:
                raise Incomplete("missing '}'")
            name = src[i + 2:j]
            if not (_identifier(name) or name.isdigit() or len(name) == 1 and name in _SPECIAL_PARAMS):
                raise ShellSyntax(f"${{{name}}}: bad substitution (only ${{NAME}} is supported)")
            self._add_param(name, quoted)
            return j + 1
        if nxt == "(":
            raise ShellSyntax("arithmetic $((...)) is not supported" if src[i + 2:i + 3] == "("
                              else "command substitution $(...) is not supported")
        if nxt and nxt.isascii() and (nxt.isalpha() or nxt == "_"):
            j = i + 1
            while j < len(src) and src[j].isascii() and (src[j].isalnum() or src[j] == "_"):
                j += 1
            self._add_param(src[i + 1:j], quoted)
            return j
        if nxt and (nxt.isdigit() and nxt.isascii() or nxt in _SPECIAL_PARAMS):
            self._add_param(nxt, quoted)
            return i + 2
        self.lit("$", quoted)
        return i + 1

    def _add_param(self, name: str, quoted: bool) -> None:
        if self.parts is None:
            self.parts = []
        self.parts.append(("param", name, quoted))

    def double_quoted(self, i: int) -> int:
        src, n = self.src, len(self.src)
        self.lit("", True)
        while True:
            if i >= n:
                raise Incomplete("unterminated quoted string")
            c = src[i]
            if c == '"':
                return i + 1
            if c == "\\":
                if i + 1 >= n:
                    raise Incomplete("unterminated quoted string")
                if src[i + 1] in '$`"\\\n':
                    if src[i + 1] != "\n":
                        self.lit(src[i + 1], True)
                    i += 2
                else:
                    self.lit("\\", True)
                    i += 1
            elif c == "$":
                i = self.param(i, True)
            elif c == "`":
                raise ShellSyntax("command substitution (`...`) is not supported")
            else:
                j = i
                while j < n and src[j] not in '"\\$`':
                    j += 1
                self.lit(src[i:j], True)
                i = j

    def run(self) -> list:
        src, n, i = self.src, len(self.src), 0
        while i < n:
            c = src[i]
            if c in " \t":
                self.end()
                i += 1
            elif c == "#" and self.parts is None:
                while i < n and src[i] != "\n":
                    i += 1
            elif c == "\\":
                if i + 1 >= n or src[i + 1] == "\n" and i + 2 >= n:
                    raise Incomplete("unexpected end of input after '\\'")
                if src[i + 1] != "\n":                   # backslash-newline: a continued line
                    self.lit(src[i + 1], True)
                i += 2
            elif c == "'":
                j = src.find("'", i + 1)
                if j < 0:
                    raise Incomplete("unterminated quoted string")
                self.lit(src[i + 1:j], True)
                i = j + 1
            elif c == '"':
                i = self.double_quoted(i + 1)
            elif c == "$":
                i = self.param(i, False)
            elif c == "`":
                raise ShellSyntax("command substitution (`...`) is not supported")
            elif c in ";&|<>()\n":
                op = next(o for o in _OPERATORS if src.startswith(o, i))
                p = self.parts
                if op in _REDIRECTS and p is not None and len(p) == 1 and p[0][0] == "lit" and not p[0][2] \
                        and p[0][1].isdigit() and p[0][1].isascii():
                    self.tokens.append(("io", int(p[0][1])))
                    self.parts = None
                else:
                    self.end()
                self.tokens.append(("op", op))
                i += len(op)
            else:
                j = i
                while j < n and src[j] not in _WORD_STOP:
                    j += 1
                self.lit(src[i:j], False)
                i = j
        self.end()
        return self.tokens


class _Command:
    __slots__ = ("assigns", "words", "redirs")

    def __init__(self):
        self.assigns, self.words, self.redirs = [], [], []


def _plain(parts) -> str | None:
    """The text of a word made of one unquoted literal (a reserved word, '!'), else None."""
    return parts[0][1] if len(parts) == 1 and parts[0][0] == "lit" and not parts[0][2] else None


def _show(token) -> str:
    if token is None:
        return "end of input"
    if token[0] == "op":
        return "newline" if token[1] == "\n" else f"'{token[1]}'"
    return "redirection" if token[0] == "io" else "word"


class _Parser:
    """program: and-or lists separated by ; or newlines; and-or: pipelines joined by && and ||;
    pipeline: [!] commands joined by |; command: NAME=VALUE... words and redirections."""

    def __init__(self, tokens: list):
        self.tokens, self.pos = tokens, 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def is_op(self, *ops) -> bool:
        t = self.peek()
        return t is not None and t[0] == "op" and t[1] in ops

    def skip_newlines(self) -> None:
        while self.is_op("\n"):
            self.pos += 1

    def program(self) -> list:
        out = []
        while True:
            self.skip_newlines()
            if self.peek() is None:
                return out
            out.append(self.and_or())
            t = self.peek()
            if t is None:
                return out
            if self.is_op(";", "\n"):
                self.pos += 1
                continue
            if self.is_op("&"):
                raise ShellSyntax("background jobs ('&') are not supported")
            raise ShellSyntax(f"{_show(t)} unexpected")

    def and_or(self) -> list:
        out = [("", self.pipeline())]
        while self.is_op("&&", "||"):
            op = self.peek()[1]
            self.pos += 1
            self.skip_newlines()
            if self.peek() is None:
                raise Incomplete(f"unexpected end of input after '{op}'")
            out.append((op, self.pipeline()))
        return out

    def pipeline(self) -> tuple:
        negate = False
        t = self.peek()
        if t is not None and t[0] == "word" and _plain(t[1]) == "!":
            negate = True
            self.pos += 1
        commands = [self.command()]
        while self.is_op("|"):
            self.pos += 1
            self.skip_newlines()
            if self.peek() is None:
                raise Incomplete("unexpected end of input after '|'")
            commands.append(self.command())
        return negate, commands

    def command(self) -> _Command:
        cmd = _Command()
        while True:
            t = self.peek()
            if t is None:
                break
            if t[0] == "word":
                parts = t[1]
                if not cmd.words:
                    head = parts[0] if parts[0][0] == "lit" and not parts[0][2] else None
                    name = head[1].split("=", 1)[0] if head is not None and "=" in head[1] else None
                    if name is not None and _identifier(name):
                        rest = head[1][len(name) + 1:]
                        cmd.assigns.append((name, ([("lit", rest, False)] if rest else []) + parts[1:]))
                        self.pos += 1
                        continue
                    if _plain(parts) in _RESERVED:
                        raise ShellSyntax(f"'{_plain(parts)}' is not supported by this shell "
                                          "(no if, for, while, case or { } blocks)")
                cmd.words.append(parts)
                self.pos += 1
            elif t[0] == "io" or t[0] == "op" and t[1] in _REDIRECTS:
                fd = None
                if t[0] == "io":
                    fd = t[1]
                    self.pos += 1
                op = self.peek()[1]
                if op == "<<":
                    raise ShellSyntax("here-documents ('<<') are not supported")
                self.pos += 1
                target = self.peek()
                if target is None or target[0] != "word":
                    raise ShellSyntax(f"{_show(target)} unexpected after '{op}'")
                self.pos += 1
                cmd.redirs.append((fd if fd is not None else (0 if op in ("<", "<&") else 1), op, target[1]))
            else:
                if t[1] in ("(", ")"):
                    raise ShellSyntax("subshells ( ... ) are not supported")
                break
        if not (cmd.assigns or cmd.words or cmd.redirs):
            raise ShellSyntax(f"{_show(self.peek())} unexpected")
        return cmd


def parse_shell(text: str) -> list:
    return _Parser(_Lexer(text).run()).program()
