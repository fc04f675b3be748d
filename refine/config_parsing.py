"""Config text and --set overrides to a settings tree, refusing what YAML would silently misread."""

from __future__ import annotations

from typing import Any

import yaml

from refine.errors import shown


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the value."""


# How many values YAML aliases may add to one document. An alias stands for its anchor's whole value, and
# PyYAML shares that value rather than copying it, so a 600-byte file of aliases to aliases (an "alias bomb")
# loads as a few kilobytes, yet stands for millions of values: whatever walks it (validation, an error
# message's repr, a dump) walks every copy. A config repeats a section or a list a few times at most.
MAX_ALIAS_VALUES = 10_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error, not the last one wins,
    and that aliases may stand for MAX_ALIAS_VALUES values in all (counted as the document is composed, before
    anything is built from it), and never for a value that contains them (a recursive document)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._alias_values = 0  # values the document's aliases stand for so far
        self._values_of: dict[int, int] = {}  # id(node) -> values in it, its aliases expanded
        self._open_anchors: set[str] = set()  # anchors whose value is being composed

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise yaml.composer.ComposerError(
                    None, None, f"alias *{event.anchor} stands for a value that contains it (a recursive "
                    f"document): a config holds no such value", event.start_mark)
            target = self.anchors.get(event.anchor)
            if target is not None:  # else PyYAML names the undefined alias
                self._alias_values += self._values(target)
                if self._alias_values > MAX_ALIAS_VALUES:
                    raise yaml.composer.ComposerError(
                        None, None, f"YAML aliases stand for more than {MAX_ALIAS_VALUES} values by alias "
                        f"*{event.anchor} (each alias repeats its anchor's whole value, so aliases of aliases "
                        f"multiply): refused as an alias bomb", event.start_mark)
            return super().compose_node(parent, index)
        anchor = getattr(event, "anchor", None)
        if anchor is None:
            return super().compose_node(parent, index)
        self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open_anchors.discard(anchor)

    def _values(self, node: yaml.Node) -> int:
        """Values in `node` with every alias in it expanded (a scalar, a sequence, a mapping count one each, plus
        their items, keys and values); remembered per node, so a value shared by many aliases is counted once."""
        known = self._values_of.get(id(node))
        if known is not None:
            return known
        count = 1
        if isinstance(node, yaml.SequenceNode):
            count += sum(self._values(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            count += sum(self._values(key) + self._values(value) for key, value in node.value)
        self._values_of[id(node)] = count
        return count

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        _refuse_yaml11_number(self.construct_scalar(node), node, octal=True)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        _refuse_yaml11_number(self.construct_scalar(node), node, octal=False)
        return super().construct_yaml_float(node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML's constructors raise plain Python errors for a tagged value they cannot build (`!!int x`,
        # `!!bool maybe`, `!!timestamp 5`): each becomes a YAML error at the value's place.
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as error:
            value = f" {node.value!r}" if isinstance(node, yaml.ScalarNode) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.tag.replace('tag:yaml.org,2002:', '!!')}{value} cannot be read as its tag "
                f"says ({type(error).__name__}: {error})", node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):  # `!!set [1]`: PyYAML names what it expected
            return super().construct_mapping(node, deep)
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            # A merge key (<<) may be overridden on purpose; other keys are scalars in a config.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {key!r} (first on line {lines[key]})", problem_mark=key_node.start_mark)
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _UniqueKeyLoader.construct_yaml_float)


def _refuse_yaml11_number(text: str, node: yaml.ScalarNode, octal: bool) -> None:
    """Refuse the two YAML 1.1 number forms that read as another number than the one written: a leading
    zero (`010` is octal 8) and colons (`1:30` is base 60, 90). PyYAML follows YAML 1.1; YAML 1.2, most
    other tools and every reader of a config take both as written."""
    digits = text.replace("_", "").lstrip("+-")
    if ":" in digits:
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is a base-60 number in YAML 1.1 (1:30 reads as 90): write the number "
            f"itself, or quote it for a string", node.start_mark)
    if octal and len(digits) > 1 and digits[0] == "0" and digits.isdigit() and int(digits, 8) != int(digits):
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is octal in YAML 1.1 (it reads as {int(digits, 8)}): write "
            f"{int(digits)} without the leading zero, or {int(digits, 8)} if octal was meant", node.start_mark)


def parse_yaml(text: str, where: str) -> Any:
    """YAML with safe tags only and unique keys; any problem is a one-line ConfigError naming `where`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: {error.problem or error.context}{at}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: {' '.join(str(error).split())}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{where}: lists or mappings nested too deeply to read (no setting nests more than a few "
                          f"levels)") from None


def set_path(tree: dict, dotted: str, raw: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (numbers, bools, lists)."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is {shown(child)}, not a section")
        node = child
    node[keys[-1]] = parse_yaml(raw, f"--set {dotted}") if raw != "" else ""


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not all(key.split(".")):  # "=5", "train.=5", "train..steps=5"
            raise ConfigError(f"override {item!r} has an empty name in its key {key!r}: "
                              f"it must look like section.field=value")
        pairs.append((key, value))
    return pairs
