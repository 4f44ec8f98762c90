"""Writes ``kohya_sdxl_train_network_args.json``: every argument of kohya's ``sdxl_train_network.py`` parser.

How it was made (and how to remake it at another commit)::

    git clone https://github.com/kohya-ss/sd-scripts && cd sd-scripts && git checkout <commit>
    python /path/to/tests/data/make_kohya_args_fixture.py /path/to/sd-scripts \\
        > /path/to/tests/data/kohya_sdxl_train_network_args.json

It does not import kohya (nor torch): it reads the source with ``ast`` and follows the parser's construction
by hand, starting at ``sdxl_train_network.setup_parser``:

- a call ``parser.add_argument("--name", ..., default=..., ...)`` records the argument (its option strings,
  dest, default, action, type, nargs, choices; a default that is not a literal is resolved from a module
  level constant, else kept as its source text);
- a call ``module.func(parser, ...)`` or ``func(parser, ...)`` whose function is found through the module's
  imports (``import library.train_util as train_util``, ``from library import sai_model_spec``,
  ``from library.utils import add_logging_arguments``) is followed with its arguments bound (literal values and
  defaults), so ``add_dataset_arguments(parser, True, True, True)`` and ``add_sdxl_training_arguments(parser)``
  take the branches kohya's do;
- ``if <test>:`` on those bound parameters takes the branch the values select; any other statement that
  contains an ``add_argument`` call stops the script (so nothing is silently missed).

The tests read only the JSON (``tests/test_kohya_arguments.py``); this script is its record.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

ENTRY = ("sdxl_train_network.py", "setup_parser")


class Reader:
    def __init__(self, root):
        self.root = root
        self.modules = {}  # relative path -> ast.Module
        self.arguments = []
        self.seen_functions = []

    def module(self, rel):
        if rel not in self.modules:
            with open(os.path.join(self.root, rel), encoding="utf-8") as f:
                self.modules[rel] = ast.parse(f.read(), rel)
        return self.modules[rel]

    def module_path(self, dotted, current_rel):
        """'library.train_util' -> 'library/train_util.py'; relative imports ('.utils') from current's folder."""
        if dotted.startswith("."):
            base = os.path.dirname(current_rel)
            dotted = dotted[1:]
            rel = os.path.join(base, *dotted.split(".")) + ".py"
        else:
            rel = os.path.join(*dotted.split(".")) + ".py"
        return rel if os.path.exists(os.path.join(self.root, rel)) else None

    def imports(self, rel):
        """name -> (module rel path, function name or None) for the module's top-level imports."""
        out = {}
        for node in self.module(rel).body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    path = self.module_path(a.name, rel)
                    if path:
                        out[a.asname or a.name.split(".")[-1]] = (path, None)
            elif isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                for a in node.names:
                    sub = self.module_path((mod + "." if node.module else mod) + a.name, rel)
                    if sub:  # from library import train_util
                        out[a.asname or a.name] = (sub, None)
                        continue
                    path = self.module_path(mod, rel)
                    if path:  # from library.utils import add_logging_arguments
                        out[a.asname or a.name] = (path, a.name)
        return out

    def function(self, rel, name):
        for node in self.module(rel).body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                return node
        raise KeyError(f"{rel}: no function {name}")

    def constant(self, rel, name):
        for node in self.module(rel).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return ast.literal_eval(node.value)
        raise KeyError(name)

    def resolve_call(self, call, rel):
        """The (module, function) a call goes to, or None when it is not a function of this repository."""
        imports = self.imports(rel)
        f = call.func
        if isinstance(f, ast.Name):
            if f.id in imports and imports[f.id][1]:
                return imports[f.id]
            try:
                self.function(rel, f.id)
                return rel, f.id
            except KeyError:
                return None
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in imports:
            path, attr = imports[f.value.id]
            if attr is None:
                return path, f.attr
        return None

    def value(self, node, env, rel):
        if isinstance(node, ast.Name) and node.id in env:
            return env[node.id]
        try:
            return ast.literal_eval(node)
        except ValueError:
            pass
        if isinstance(node, ast.Name):
            try:
                return self.constant(rel, node.id)
            except (KeyError, ValueError):
                pass
        return {"source": ast.unparse(node)}

    def walk_function(self, rel, name, positional, keywords):
        fn = self.function(rel, name)
        self.seen_functions.append(f"{rel}:{name}")
        params = [a.arg for a in fn.args.args]
        defaults = fn.args.defaults
        env = {}
        for p, d in zip(params[len(params) - len(defaults):], defaults):
            env[p] = ast.literal_eval(d)
        for p, v in zip(params, positional):
            env[p] = v
        env.update(keywords)
        outer, self.parser_name = getattr(self, "parser_name", None), params[0] if params else None
        for stmt in fn.body:
            self.walk_statement(stmt, env, rel, self.parser_name)
        self.parser_name = outer

    def walk_statement(self, stmt, env, rel, parser_name):
        if isinstance(stmt, ast.If):
            test = self.value(stmt.test, env, rel) if not isinstance(stmt.test, (ast.BoolOp, ast.UnaryOp)) else None
            if isinstance(stmt.test, ast.UnaryOp) and isinstance(stmt.test.op, ast.Not):
                inner = self.value(stmt.test.operand, env, rel)
                test = None if isinstance(inner, dict) else not inner
            if test is None or isinstance(test, dict):
                raise SystemExit(f"{rel}:{stmt.lineno}: cannot evaluate `if {ast.unparse(stmt.test)}`")
            for s in stmt.body if test else stmt.orelse:
                self.walk_statement(s, env, rel, parser_name)
            return
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
            call = stmt.value
            f = call.func
            if (isinstance(f, ast.Attribute) and f.attr == "add_argument" and isinstance(f.value, ast.Name)
                    and f.value.id == parser_name):
                self.record(call, env, rel)
                return
            if call.args and isinstance(call.args[0], ast.Name) and call.args[0].id == parser_name:
                target = self.resolve_call(call, rel)
                if target is None:
                    raise SystemExit(f"{rel}:{stmt.lineno}: cannot follow {ast.unparse(call)}")
                positional = [None] + [self.value(a, env, rel) for a in call.args[1:]]
                keywords = {k.arg: self.value(k.value, env, rel) for k in call.keywords}
                self.walk_function(target[0], target[1], positional, keywords)
                return
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call) and len(stmt.targets) == 1 \
                and isinstance(stmt.targets[0], ast.Name):
            # parser = argparse.ArgumentParser() / parser = train_network.setup_parser(): later calls use it
            f = stmt.value.func
            if isinstance(f, ast.Attribute) and f.attr == "ArgumentParser":
                self.parser_name = stmt.targets[0].id
                return
            target = self.resolve_call(stmt.value, rel)
            if target is not None and target[1] == "setup_parser":
                self.walk_function(*target, [], {})
                self.parser_name = stmt.targets[0].id
                return
        if isinstance(stmt, ast.Return):
            return
        for node in ast.walk(stmt):
            if isinstance(node, ast.Attribute) and node.attr == "add_argument":
                raise SystemExit(f"{rel}:{stmt.lineno}: add_argument in a statement this script does not follow")

    def record(self, call, env, rel):
        options = [self.value(a, env, rel) for a in call.args]
        if not all(isinstance(o, str) for o in options):
            raise SystemExit(f"{rel}:{call.lineno}: option names not literal: {ast.unparse(call)}")
        kw = {k.arg: k.value for k in call.keywords}
        long = [o for o in options if o.startswith("--")]
        entry = {"name": long[0] if long else options[0], "options": options,
                 "dest": self.value(kw["dest"], env, rel) if "dest" in kw else long[0][2:].replace("-", "_"),
                 "source": f"{rel}:{call.lineno}"}
        action = self.value(kw["action"], env, rel) if "action" in kw else None
        if action is not None:
            entry["action"] = action
        if "default" in kw:
            entry["default"] = self.value(kw["default"], env, rel)
        elif action == "store_true":
            entry["default"] = False
        elif action == "store_false":
            entry["default"] = True
        else:
            entry["default"] = None
        if "type" in kw:
            entry["type"] = ast.unparse(kw["type"])
        for key in ("nargs", "choices", "const"):
            if key in kw:
                entry[key] = self.value(kw[key], env, rel)
        self.arguments.append(entry)


def main(root):
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    reader = Reader(root)
    reader.walk_function(*ENTRY, [], {})
    names = [a["name"] for a in reader.arguments]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"duplicate arguments: {duplicates}")
    out = {
        "about": "every argument of kohya-ss/sd-scripts sdxl_train_network.py's parser (setup_parser), read from "
                 "its source with tests/data/make_kohya_args_fixture.py (ast, no import of kohya or torch)",
        "repository": "https://github.com/kohya-ss/sd-scripts",
        "commit": commit,
        "entry": ":".join(ENTRY),
        "functions": reader.seen_functions,
        "count": len(reader.arguments),
        "arguments": reader.arguments,
    }
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
