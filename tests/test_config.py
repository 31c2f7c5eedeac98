"""The config is checked as a whole before anything runs: types, ranges, known forms, and None as a value."""
import subprocess
import sys

import pytest

from pc_clip.core.config import PROFILES, Config, ConfigError, get_config, given, validate_config


@pytest.mark.parametrize("override, field, says", [
    ({"ft_lr": "abc"}, "ft_lr", "expected a float"),
    ({"n_pairs": -5}, "n_pairs", ">= 1"),
    ({"ft_batch_size": 0}, "ft_batch_size", ">= 2"),
    ({"ft_batch_size": 1}, "ft_batch_size", "contrastive"),
    ({"oracle_noise": 2}, "oracle_noise", "[0, 1]"),
    ({"ft_epochs": None}, "ft_epochs", "None is not allowed"),
    ({"load_in_4bit": "yes"}, "load_in_4bit", "True or False"),
    ({"eval_seeds": (0, "a")}, "eval_seeds", "tuple of ints"),
    ({"ft_trainable": "everything"}, "ft_trainable", "text_blocks"),
    ({"ft_loss": "hinge"}, "ft_loss", "contrastive"),
    ({"generator": "openai:"}, "generator", "name the served model"),
    ({"judge": ""}, "judge", "None (no judge)"),
    ({"ft_lr": 0.0}, "ft_lr", "> 0"),
    ({"ft_lr": float("nan")}, "ft_lr", "> 0"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"t2i_image_size": 100}, "t2i_image_size", "multiple of 8"),
    ({"device": "gpu"}, "device", "cuda"),
    ({"ft_lr_grid": (0,)}, "ft_lr_grid", "> 0"),
    ({"ft_lr_grid": (1e-3, float("inf"))}, "ft_lr_grid", "finite"),
    ({"wavg_alpha_grid": (2.0,)}, "wavg_alpha_grid", "[0, 1]"),
    ({"ft_keep_epochs": (-3,)}, "ft_keep_epochs", ">= 1"),
    ({"ft_lr": 1e-3, "ft_lr_grid": (1e-3, 2e-3)}, "ft_lr", "give one of them"),
])
def test_each_bad_value_is_one_message_naming_its_field(override, field, says):
    with pytest.raises(ConfigError) as e:
        get_config("tiny", **override)
    assert len(e.value.problems) == 1, e.value.problems
    assert e.value.problems[0].startswith(f"{field}:") and says in e.value.problems[0], e.value.problems


def test_all_bad_fields_are_reported_together():
    with pytest.raises(ConfigError) as e:
        get_config("tiny", ft_lr="abc", n_pairs=-5, ft_batch_size=0, oracle_noise=2)
    assert sorted(p.split(":")[0] for p in e.value.problems) == ["ft_batch_size", "ft_lr", "n_pairs", "oracle_noise"]


def test_none_is_a_value_where_the_field_allows_it():
    assert get_config("paper").judge is not None
    assert get_config("paper", judge=None).judge is None  # no longer dropped
    assert get_config("tiny", ft_max_pairs=None).ft_max_pairs is None
    assert get_config("tiny", pretrained=None).pretrained is None
    # a notebook parameter left at None means "the profile's value": `given` leaves it out
    assert get_config("paper", **given(ft_epochs=None, ft_lr=None)).ft_epochs == 20
    assert get_config("paper", **given(ft_epochs=3)).ft_epochs == 3


def test_values_are_coerced_only_where_nothing_is_lost():
    cfg = get_config("tiny", ft_lr=1, eval_seeds=[3, 4], comparative_alphas=[1, 0.5])
    assert cfg.ft_lr == 1.0 and isinstance(cfg.ft_lr, float)
    assert cfg.eval_seeds == (3, 4) and cfg.comparative_alphas == (1.0, 0.5)
    with pytest.raises(ConfigError):
        get_config("tiny", n_pairs=12.5)  # a float is not a count
    with pytest.raises(ConfigError):
        get_config("tiny", n_pairs=True)  # nor is a bool


def test_replace_validates_too():
    with pytest.raises(ConfigError, match="ft_batch_size"):
        get_config("tiny").replace(ft_batch_size=1)
    assert get_config("tiny").replace(ft_loss="mse", ft_batch_size=1).ft_batch_size == 1


def test_every_profile_is_valid_and_paper_runs_offline():
    for name in PROFILES:
        assert validate_config(get_config(name)) == [], name
    paper = get_config("paper")
    assert paper.judge == paper.generator and not paper.judge.startswith("openai:")
    assert get_config("paper", judge="openai:gpt-4o-mini").judge == "openai:gpt-4o-mini"  # still an option
    assert get_config("paper", judge="openai:").judge == "openai:"  # the judge module's default model
    assert get_config("paper", generator="openai:meta-llama/Llama-2-13b-chat-hf").generator.startswith("openai:")  # a served LLM


def test_paper_smoke_is_paper_at_toy_scale():
    smoke, paper = get_config("paper-smoke"), get_config("paper")
    assert (smoke.model_name, smoke.pretrained, smoke.generator, smoke.judge) == ("pc-clip-smoke", "smoke", "tiny-chat", "tiny-chat")
    assert (smoke.ft_epochs, smoke.ft_batch_size, smoke.t2i_steps, smoke.t2i_image_size) == (2, 16, 2, 64)
    assert smoke.n_pairs < 1000 and smoke.eval_n_images < paper.eval_n_images
    same = ("corpus", "pair_sampling", "load_in_4bit", "ft_trainable", "ft_loss", "ft_lr_decay", "ft_temperature",
            "ft_max_pairs")
    assert [getattr(smoke, k) for k in same] == [getattr(paper, k) for k in same]
    assert smoke.ft_lr >= 1e3 * paper.ft_lr  # a learning rate that moves the stand-in's weights (issue 21)


def test_checking_a_config_imports_neither_torch_nor_pandas():
    code = ("import sys; from pc_clip.core.runtime import get_config; get_config('paper', ft_lr=1e-3); "
            "print('torch' in sys.modules, 'pandas' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "False"], r.stderr


def test_a_config_built_by_hand_is_checked_by_validate_config():
    assert validate_config(Config()) == []
    assert [p.split(":")[0] for p in validate_config(Config(n_pairs=0, corpus="imagenet"))] == ["n_pairs", "corpus"]


def test_ft_lr_alone_is_one_learning_rate_for_every_caller():
    "The CLI and every notebook build their config with get_config: ft_lr alone collapses both grids, in all of them."
    one = get_config("tiny", ft_lr=1e-3)
    assert (one.ft_lr_grid, one.wavg_alpha_grid) == ((), ())
    assert get_config("tiny", ft_lr=1e-3, ft_lr_grid=[]) == one  # the grid given empty too: the same config
    assert get_config("tiny", ft_lr=1e-3, wavg_alpha_grid=(0.5, 1.0)).wavg_alpha_grid == (0.5, 1.0)  # an alpha sweep at that lr
    assert get_config("tiny").ft_lr_grid == (1e-3, 2e-3)  # nothing given: the profile's sweep
    assert get_config("paper", ft_lr=1e-7).ft_lr_grid == ()
