"""docs/architecture.md names only what exists.

Every backtick span of the page's prose that looks like code is checked:

- `leaseagent.x.y` and `leaseagent.x.y.name` (or `x.y.name`, for a module of the
  package): the module imports and has the name;
- a file (`core/plan.py`, `deploy/prometheus/leaseagent-rules.yml`): some file of
  the repository has that path, or ends with it (the page writes package paths
  from `leaseagent/`);
- `Class.attr`, `function()`: a class of the package with that attribute, a
  function or class the package defines; a private name only as `Class._name`;
- any other identifier: a name the package defines, a module Python imports, a
  string the package's code holds (a JSON field, a reason code, a metric name),
  a Prometheus counter's sample name (`<counter>_total`), or one of the few names of
  flannel's and the tools' own listed below.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"

# Names the page quotes from flannel's Go code, the kernel tools and the shell: not ours.
NOT_OURS = frozenset({
    "CheckNetworkConfig", "LeaseAttrs", "ParseUint", "WriteSubnetFile", "isIPv6SubnetConfigCompat",
    "masqIP6Rules", "masqRules", "mk-docker-opts.sh", "Backend.Type",  # flannel's
    "python3", "leasectl", "malloc_trim", "inet", "ip", "ip6", "nft", "ipset", "udp",
})

_PATH = re.compile(r"^[\w.-]+(/[\w.-]+)*\.(py|toml|yml|yaml|md|service|sh|cfg)$")
_IDENT = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(\(\))?$")


def spans(text: str | None = None) -> list[str]:
    text = re.sub(r"```.*?```", "", DOC.read_text() if text is None else text, flags=re.S)
    return sorted({" ".join(s.split()) for s in re.findall(r"`([^`]+)`", text)})


class Index:
    """What the package defines: top-level names, classes' attributes, string constants."""

    def __init__(self) -> None:
        self.defined: set[str] = set()  # functions, classes, module-level names
        self.attributes: dict[str, set[str]] = {}  # class -> its methods and fields
        self.strings: set[str] = set()
        for path in (ROOT / "leaseagent").rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in tree.body:
                self._top(node)
            # Docstrings name things too: only the strings the code uses count.
            docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and id(node) not in docs:
                    self.strings.update(re.findall(r"[A-Za-z_][\w.]*", node.value))
                if isinstance(node, ast.ClassDef):
                    self.attributes.setdefault(node.name, set()).update(_members(node))

    def _top(self, node: ast.stmt) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            self.defined.add(node.name)
        elif isinstance(node, ast.Assign):
            self.defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            self.defined.add(node.target.id)


def _members(cls: ast.ClassDef) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
        elif isinstance(node, ast.Assign):
            out.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "self":
            out.add(node.attr)
    return out


def _dotted_exists(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except ModuleNotFoundError:  # a name inside a module, not a submodule
            continue
        obj: object = importlib.import_module(module)
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _is_ours(module: str) -> bool:
    """Whether `module` is a module of the package written without `leaseagent.`
    (`core.rules.jump_index`)."""
    return importlib.util.find_spec(f"leaseagent.{module}") is not None


def _file_exists(path: str) -> bool:
    if (ROOT / path).exists() or (ROOT / "leaseagent" / path).exists():
        return True
    return any(p.as_posix().endswith("/" + path) for p in ROOT.rglob(Path(path).name)
               if ".venv" not in p.parts and ".git" not in p.parts)


def missing(index: Index, text: str | None = None) -> list[str]:
    wrong = []
    for span in spans(text):
        if span in NOT_OURS:
            continue
        if _PATH.match(span):
            if not _file_exists(span):
                wrong.append(f"file {span}")
            continue
        if not _IDENT.match(span):
            continue  # a command, a flag, a key template: not a name of code
        name = span.removesuffix("()")
        head, _, attr = name.rpartition(".")
        if name.startswith("leaseagent.") or (head and _is_ours(name.split(".")[0])):
            full = name if name.startswith("leaseagent.") else "leaseagent." + name
            if not _dotted_exists(full):
                wrong.append(f"module or symbol {span}")
        elif head:
            if attr not in index.attributes.get(head.split(".")[-1], set()):
                wrong.append(f"attribute {span}")
        elif name.startswith("_"):  # a private name is only clear with its class
            wrong.append(f"private name without its class or module: {span}")
        elif span.endswith("()"):
            if name not in index.defined and not any(name in a for a in index.attributes.values()):
                wrong.append(f"function {span}")
        elif not (name in index.defined or name in index.strings
                  or name.removesuffix("_total") in index.strings
                  or any(name in a for a in index.attributes.values())
                  or importlib.util.find_spec(name) is not None):
            wrong.append(f"name {span}")
    return wrong


def test_every_module_file_and_symbol_the_architecture_page_names_exists() -> None:
    assert missing(Index()) == []


def test_the_check_finds_names_that_do_not_exist() -> None:
    page = ("`leaseagent.core.plan.compare` and `core/plan.py` exist, `KeyLayout` and\n"
            "`Agent.not_ready_reason` too; `leaseagent.core.plan.plan_nothing` does not,\n"
            "nor `core/no_such.py`, `Agent.no_such`, `no_such_function()`, `_private`\n"
            "`core.rules.no_such` or `NoSuchClass`.\n```\n`ignored in a code block`\n```\n")
    assert sorted(missing(Index(), page)) == sorted([
        "private name without its class or module: _private",
        "attribute Agent.no_such",
        "name NoSuchClass",
        "file core/no_such.py",
        "module or symbol leaseagent.core.plan.plan_nothing",
        "module or symbol core.rules.no_such",
        "function no_such_function()",
    ])
