"""Find every TensorRT API use in the repository's Python files and check it against a module.

A small flow-insensitive reader of the AST, per file that imports ``tensorrt``:

* names bound to the module (``import tensorrt as trt``, ``self.trt = trt``, ``trt = self.trt``,
  a parameter named like one of those) make ``trt.A.B`` chains, ``getattr(trt, "A")`` and
  ``hasattr(trt, "A")`` uses;
* values made by TensorRT get its classes: ``trt.Builder(...)`` is a ``Builder``; a method's
  return class comes from its pybind11 signature (``create_network(...) -> ...INetworkDefinition``),
  so ``builder.create_network(0).add_input`` or ``context.set_device_memory`` are uses too, and
  keyword arguments are checked against the signature.

Run as a script (``python trt_api_scan.py MODULE ROOT``) it prints JSON: the module's version and
every use with whether it exists. The test runs it in a subprocess, so that the bindings can be
imported on their own (see tests/test_tensorrt_api.py).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = {".git", "build", "dist", "out", "__pycache__", "node_modules"}
_RETURN = re.compile(r"->\s*([\w.]+)\s*$")


@dataclass(frozen=True)
class Use:
    file: str
    line: int
    use: str
    ok: bool


def python_files(root: Path) -> list[Path]:
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in SKIP_DIRS or p.startswith(".venv") for p in parts[:-1]):
            continue
        out.append(path)
    return out


def imports_tensorrt(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Import) and any(a.name == "tensorrt" for a in n.names) for n in ast.walk(tree))


class _Mod:
    """The tensorrt module as a value."""

    def __repr__(self):
        return "trt"


MOD = _Mod()


def _is(value, kind: str) -> bool:
    return isinstance(value, tuple) and value[:1] == (kind,)


class Scanner:
    def __init__(self, module):
        self.module = module
        self.uses: dict[tuple, Use] = {}

    # -- what TensorRT values are ------------------------------------------------------------

    def _class_of_doc(self, doc: str | None):
        """The TensorRT class a pybind11 signature returns (all overloads agreeing), else None."""
        found = set()
        for line in (doc or "").splitlines():
            m = _RETURN.search(line.strip())
            if m and "(" in line:
                found.add(m.group(1).rsplit(".", 1)[-1])
        if len(found) == 1:
            cls = getattr(self.module, found.pop(), None)
            if isinstance(cls, type):
                return ("inst", cls)
        return None

    def attribute(self, base, attr: str, where: tuple[str, int], record: bool = True):
        if base is None:
            return None
        if base is MOD:
            owner, label = self.module, "tensorrt"
        elif base[0] == "obj":
            owner, label = base[1], getattr(base[1], "__name__", type(base[1]).__name__)
        elif base[0] == "inst":
            owner, label = base[1], base[1].__name__
        else:
            return None
        ok = hasattr(owner, attr)
        if record:
            use = f"{label}.{attr}"
            self.uses.setdefault((where[0], where[1], use), Use(where[0], where[1], use, ok))
        if not ok:
            return None
        if base is not MOD and base[0] == "inst":
            static = inspect.getattr_static(owner, attr, None)
            if isinstance(static, property):
                return self._class_of_doc(static.fget.__doc__) if static.fget else None
            return ("meth", owner, attr) if callable(static) else None
        value = getattr(owner, attr)
        if isinstance(owner, type) and callable(value) and not isinstance(value, (type, owner)):
            return ("meth", owner, attr)  # a method looked up on the class
        return ("obj", value)

    def call(self, func, node: ast.Call, where):
        if func is None or func is MOD:
            return None
        if func[0] == "obj" and isinstance(func[1], type):
            return ("inst", func[1])
        if func[0] == "meth":
            owner, name = func[1], func[2]
            doc = getattr(getattr(owner, name, None), "__doc__", "") or ""
            for kw in node.keywords:
                if kw.arg is None:
                    continue
                use = f"{owner.__name__}.{name}({kw.arg}=)"
                ok = re.search(rf"\b{re.escape(kw.arg)}\s*:", doc) is not None
                self.uses.setdefault((where[0], node.lineno, use), Use(where[0], node.lineno, use, ok))
            return self._class_of_doc(doc)
        if func[0] == "obj" and callable(func[1]):
            return self._class_of_doc(getattr(func[1], "__doc__", ""))
        return None

    # -- the AST ---------------------------------------------------------------------------

    def scan_file(self, path: Path, root: Path) -> None:
        tree = ast.parse(path.read_text(), filename=str(path))
        if not imports_tensorrt(tree):
            return
        rel = str(path.relative_to(root))
        module_names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                        for a in n.names if a.name == "tensorrt"}
        # names that hold the module anywhere in the file (so a parameter `trt` is the module)
        for n in ast.walk(tree):
            if isinstance(n, ast.Assign):
                for t in n.targets:
                    for name in ([t] if isinstance(t, ast.Attribute) else
                                 [e for e in getattr(t, "elts", []) if isinstance(e, ast.Attribute)]):
                        if isinstance(name, ast.Attribute) and name.attr in module_names:
                            module_names.add(name.attr)
        classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        owner_class = {id(f): c for c in classes for f in ast.walk(c) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self_attrs: dict[int, dict[str, object]] = {id(c): {} for c in classes}
        top = ast.Module(body=[s for s in tree.body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                          ast.ClassDef))], type_ignores=[])
        top_level = {a.asname or a.name for n in ast.walk(top) if isinstance(n, ast.Import)
                     for a in n.names if a.name == "tensorrt"}  # `import tensorrt as trt` at the top
        envs = {id(f): {**{name: MOD for name in top_level},
                        **{a.arg: MOD for a in f.args.args + f.args.kwonlyargs if a.arg in module_names}}
                for f in functions}
        self._functions = {f.name: f for f in functions}
        self._envs = envs
        self._returns: dict[str, object] = {}
        for _ in range(3):  # flow-insensitive: bindings settle in a few rounds
            for f in functions:
                cls = owner_class.get(id(f))
                self._bind(f, envs[id(f)], self_attrs[id(cls)] if cls else {}, module_names, rel)
        for f in functions:
            cls = owner_class.get(id(f))
            self._record(f, envs[id(f)], self_attrs[id(cls)] if cls else {}, rel)
        # module-level code (e.g. a script's top level)
        self._record(top, {name: MOD for name in top_level}, {}, rel)

    def _eval(self, node, env, attrs, rel, record):
        where = (rel, getattr(node, "lineno", 0))
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return attrs.get(node.attr)
            return self.attribute(self._eval(node.value, env, attrs, rel, record), node.attr, where, record)
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("getattr", "hasattr") and len(node.args) >= 2:
                name = node.args[1]
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    names = (name.value,)
                elif isinstance(name, ast.Name) and _is(env.get(name.id), "strs"):
                    names = env[name.id][1]  # getattr(trt.DataType, n) over a literal list of names
                else:
                    return None
                base = self._eval(node.args[0], env, attrs, rel, record)
                values = [self.attribute(base, n, where, record) for n in names]
                return values[0] if f.id == "getattr" and len(values) == 1 else None
            own = f.id if isinstance(f, ast.Name) else (
                f.attr if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "self" else None)
            if own in self._functions:
                for a in node.args:  # uses inside the arguments
                    self._eval(a, env, attrs, rel, record)
                return self._returns.get(own)
            return self.call(self._eval(f, env, attrs, rel, record), node, where)
        if isinstance(node, ast.Tuple):
            return ("tuple", tuple(self._eval(e, env, attrs, rel, record) for e in node.elts))
        return None

    def _bind(self, func, env, attrs, module_names, rel):
        for node in ast.walk(func):
            if isinstance(node, ast.For) and isinstance(node.iter, (ast.Tuple, ast.List)):
                rows = [e.elts if isinstance(e, ast.Tuple) else [e] for e in node.iter.elts]
                names = node.target.elts if isinstance(node.target, ast.Tuple) else [node.target]
                for i, name in enumerate(names):
                    column = [r[i] for r in rows if i < len(r)]
                    if isinstance(name, ast.Name) and column and all(
                            isinstance(c, ast.Constant) and isinstance(c.value, str) for c in column):
                        env[name.id] = ("strs", tuple(c.value for c in column))
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "tensorrt":
                        env[a.asname or a.name] = MOD
            if isinstance(node, ast.Call):  # a TensorRT value passed to a function of this file
                f = node.func
                callee = self._functions.get(f.id if isinstance(f, ast.Name) else
                                             f.attr if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                                             and f.value.id == "self" else "")
                if callee is not None:
                    params = [a.arg for a in callee.args.args]
                    if params[:1] == ["self"] and isinstance(f, ast.Attribute):
                        params = params[1:]
                    for param, a in zip(params, node.args):
                        value = self._eval(a, env, attrs, rel, record=False)
                        if value is not None:
                            self._envs[id(callee)].setdefault(param, value)
            if isinstance(node, ast.Return) and node.value is not None and isinstance(func, ast.FunctionDef):
                value = self._eval(node.value, env, attrs, rel, record=False)
                if value is not None and not (_is(value, "tuple") and all(v is None for v in value[1])):
                    self._returns[func.name] = value
            if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                whole = self._eval(node.value, env, attrs, rel, record=False)
                if isinstance(target, ast.Tuple) and _is(whole, "tuple") and len(whole[1]) == len(target.elts):
                    pairs = list(zip(target.elts, whole[1]))
                else:
                    pairs = [(target, whole)]
                for t, value in pairs:
                    if value is None or _is(value, "tuple"):
                        continue
                    if isinstance(t, ast.Name):
                        env[t.id] = value
                    elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        attrs[t.attr] = value

    def _record(self, func, env, attrs, rel):
        for node in ast.walk(func):
            if isinstance(node, (ast.Attribute, ast.Call)):
                self._eval(node, env, attrs, rel, record=True)


def scan(module, root: Path) -> list[Use]:
    scanner = Scanner(module)
    for path in python_files(root):
        scanner.scan_file(path, root)
    return sorted(scanner.uses.values(), key=lambda u: (u.file, u.line, u.use))


def main(argv: list[str]) -> int:
    module = importlib.import_module(argv[0])
    uses = scan(module, Path(argv[1]).resolve())
    print(json.dumps({"module": argv[0], "version": module.__version__,
                      "uses": [u.__dict__ for u in uses]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
