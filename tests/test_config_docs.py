"""The config documents itself: every key has a type, a default and a description, generated from the
dataclasses in config.py (one source), and the help text lists them."""
from mixedae_fast.config import SECTIONS, config_key, load_config
from mixedae_fast.config_docs import _field_comments, describe_config, key_docs


def test_every_config_key_has_a_description():
    docs = key_docs()
    assert [d.key.split(".")[0] for d in docs[:1]] == ["model"]
    assert {d.key for d in docs} == {f"{s}.{config_key(f)}" for s, cls in SECTIONS.items()
                                     for f in cls.__dataclass_fields__}
    assert "init.from" in {d.key for d in docs}                                  # the field from_
    missing = [d.key for d in docs if len(d.doc) < 8]
    assert not missing, f"add a comment to these fields in mixedae_fast/config.py: {missing}"


def test_comments_are_read_from_the_line_or_the_lines_above():
    from dataclasses import dataclass

    @dataclass
    class Demo:
        a: int = 1  # the first
        # spread over
        # two lines
        b: str = "x # not a comment"
        c: float = 0.5  # a long one
        #   that goes on below
        d: int = 2  # d's own

    assert _field_comments(Demo) == {"a": "the first", "b": "spread over two lines",
                                     "c": "a long one that goes on below", "d": "d's own"}


def test_help_text_shows_choices_and_a_presets_values():
    text = describe_config()
    assert "mixing.ha_layers" in text and "runtime.attention_backend" in text
    assert "auto | fp32 | bf16 | fp16" in text                            # choices come from CHOICES
    tiny = describe_config(load_config("cpu_tiny"))
    assert "model.img_size               int = 32" in tiny and "model.img_size               int = 224" in text
