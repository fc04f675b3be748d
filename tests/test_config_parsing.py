"""YAML config text and `--set` overrides: unsafe tags, duplicate keys, YAML 1.1 numbers and alias limits refused."""

import pytest

from refine.config import RunConfig, load_config
from refine.config_parsing import MAX_ALIAS_VALUES, ConfigError, parse_yaml


@pytest.mark.parametrize("text,error", [
    ("train: [1\n", r"expected ',' or '\]', but got '<stream end>' at line 2"),
    ("train: !!python/object:os.system\n  steps: 1\n", r"could not determine a constructor for the tag "
                                                       r"'tag:yaml.org,2002:python/object:os.system' at line 1"),
    ("train: {steps: 2, steps: 5}\n", r"duplicate key 'steps' \(first on line 1\) at line 1, column 19"),
    ("train:\n  steps: 2\nrefine:\n  margin: 3\ntrain:\n  steps: 5\n",
     r"duplicate key 'train' \(first on line 1\) at line 5, column 1"),
])
def test_yaml_problems_in_a_config_file_name_the_file_and_line(tmp_path, text, error):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^config file {path}: {error}"):
        load_config(path)


@pytest.mark.parametrize("text,error", [
    ("train:\n  seed: 010\n", r"'010' is octal in YAML 1\.1 \(it reads as 8\): write 10 without the leading zero, "
                              r"or 8 if octal was meant at line 2, column 9"),
    ("train:\n  steps: 1:30\n", r"'1:30' is a base-60 number in YAML 1\.1 \(1:30 reads as 90\)"),
    ("optim:\n  lr: 1:0.5\n", r"'1:0\.5' is a base-60 number in YAML 1\.1"),
])
def test_yaml_11_numbers_that_read_as_other_numbers_are_refused(tmp_path, text, error):
    """PyYAML follows YAML 1.1, where 010 is 8 and 1:30 is 90: taken silently, a seed or a step count
    would differ from the one written."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^config file {path}: {error}"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^--set train\.seed: '010' is octal"):
        load_config(None, ["train.seed=010"])


@pytest.mark.parametrize("value,expected", [("10", 10), ("007", 7), ("0", 0), ("0x10", 16), ("-3", -3)])
def test_numbers_that_read_as_written_are_kept(value, expected):
    assert load_config(None, [f"train.seed={value}"]).train.seed == expected


def test_a_merge_key_may_still_be_overridden(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {<<: {steps: 2, batch_size: 2}, steps: 3}\n")
    assert (load_config(path).train.steps, load_config(path).train.batch_size) == (3, 2)


@pytest.mark.parametrize("override,error", [
    ("train.steps=[1", r"--set train\.steps: expected ',' or '\]', but got '<stream end>' at line 1, column 3"),
    ("train.steps=!!python/name:os.system", r"--set train\.steps: could not determine a constructor for the tag "
                                            r"'tag:yaml.org,2002:python/name:os.system'"),
    ("train={steps: 1, steps: 2}", r"--set train: duplicate key 'steps'"),
])
def test_yaml_problems_in_an_override_name_the_key(override, error):
    with pytest.raises(ConfigError, match=error):
        load_config(None, [override])


@pytest.mark.parametrize("value,error", [
    ("!!bool x", r"!!bool 'x' cannot be read as its tag says \(KeyError: 'x'\)"),
    ("!!int ''", r"!!int '' cannot be read as its tag says \(IndexError"),
    ("!!int x", r"!!int 'x' cannot be read as its tag says \(ValueError: invalid literal"),
    ("!!timestamp 5", r"!!timestamp '5' cannot be read as its tag says \(AttributeError"),
    ("!!timestamp 2020-13-45", r"!!timestamp '2020-13-45' cannot be read as its tag says \(ValueError: month"),
    ("!!set [1]", r"expected a mapping node, but found sequence"),
])
def test_a_tagged_value_its_tag_cannot_build_names_the_setting(tmp_path, value, error):
    """PyYAML raises plain KeyError/IndexError/... for these, which ended the command with a traceback."""
    with pytest.raises(ConfigError, match=rf"^--set train\.seed: {error}.* at line 1, column 1$"):
        load_config(None, [f"train.seed={value}"])
    path = tmp_path / "run.yaml"
    path.write_text(f"train:\n  seed: {value}\n")
    with pytest.raises(ConfigError, match=rf"^config file {path}: {error}.* at line 2, column 9$"):
        load_config(path)


def _alias_bomb(levels: int, width: int = 9) -> str:
    """A YAML document of a few hundred bytes under unknown keys of `data:` whose aliases stand for
    width ** levels strings: PyYAML shares the anchored list, so it loads small and expands when walked."""
    lines = ["data:", f"  l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_before_anything_walks_it(tmp_path, monkeypatch):
    """The review's file: 7 levels of 9 aliases (9 ** 8 strings) took 8 GB and 28 s to report an unknown key,
    its whole expansion walked by validation and repr'd for the message. It is refused as the YAML is composed,
    naming the limit and the alias, and nothing validates or formats the expansion."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(7))
    assert len(path.read_bytes()) < 600

    def validate(*args, **kwargs):
        raise AssertionError("the alias bomb reached validation")

    monkeypatch.setattr(RunConfig, "model_validate", validate)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    limit = MAX_ALIAS_VALUES
    assert message.startswith(f"config file {path}: YAML aliases stand for more than {limit} values by alias *l")
    assert "alias bomb" in message and "at line" in message and "\n" not in message and len(message) < 400


def test_aliases_of_a_merge_key_multiply_too(tmp_path):
    # flatten_mapping copies every merged mapping's items into the node: nested merges of merges multiply as
    # aliases of aliases do, during construction.
    lines = ["data:", "  m0: &m0 {a: 1, b: 2, c: 3, d: 4}"]
    lines += [f"  m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 9)}]}}" for i in range(1, 8)]
    path = tmp_path / "merge.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"YAML aliases stand for more than \d+ values by alias \*m\d"):
        load_config(path)


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("data:\n  loop: &loop [1, *loop]\n")
    with pytest.raises(ConfigError, match=rf"^config file {path}: alias \*loop stands for a value that contains it "
                                          r"\(a recursive document\).* at line 2, column 19$"):
        load_config(path)


def test_small_anchors_and_aliases_still_load(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("data:\n  synthetic_tasks: &tasks [niah, mqar]\n  num_documents: 64\n"
                    "train: {<<: &small {seed: 2, batch_size: 2}, seed: 3}\n"
                    "demo:\n  eval_tasks: *tasks\n")
    config = load_config(path)
    assert config.data.synthetic_tasks == config.demo.eval_tasks == ["niah", "mqar"]
    assert (config.train.seed, config.train.batch_size) == (3, 2)
    # Within the limit, many aliases of one value are fine: 100 aliases of a list of 40 strings.
    many = "words: &w [" + ", ".join(["w"] * 40) + "]\nlists: [" + ", ".join(["*w"] * 100) + "]\n"
    assert 100 * 41 <= MAX_ALIAS_VALUES
    assert len(parse_yaml(many, "many")["lists"]) == 100


@pytest.mark.parametrize("value", ["[" * 3000 + "]" * 3000, "{a: " * 3000 + "1" + "}" * 3000])
def test_settings_nested_past_the_parser_are_one_line_errors(tmp_path, value):
    with pytest.raises(ConfigError, match=r"--set train.steps: lists or mappings nested too deeply to read"):
        load_config(None, [f"train.steps={value}"])
    path = tmp_path / "deep.yaml"
    path.write_text(f"train:\n  steps: {value}\n")
    with pytest.raises(ConfigError, match=rf"config file {path}: lists or mappings nested too deeply to read"):
        load_config(path)
