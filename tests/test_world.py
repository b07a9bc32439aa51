import numpy as np
import pytest

from tlcm.shapes import render as R
from tlcm.shapes import world as W

pytestmark = pytest.mark.math


def test_sampling_and_rendering_are_deterministic():
    a, b = W.sample_specs(5, 20, "train"), W.sample_specs(5, 20, "train")
    assert a == b
    assert np.array_equal(R.render_batch(a, 3), R.render_batch(b, 3))
    assert not np.array_equal(R.render_batch(a, 3), R.render_batch(a, 4))


@pytest.mark.parametrize("split", ["train", "eval", "compositional"])
def test_splits_are_disjoint(split):
    specs = W.sample_specs(0, 300, split)
    assert all(s.split() == split for s in specs)
    has_heldout_pair = [any((o.colour, o.shape) in W.HELDOUT_PAIRS for o in s.objects) for s in specs]
    assert all(has_heldout_pair) if split == "compositional" else not any(has_heldout_pair)


def test_train_and_eval_captions_never_overlap():
    train = {s.caption() for s in W.sample_specs(0, 3000, "train")}
    ev = {s.caption() for s in W.sample_specs(0, 300, "eval")}
    assert not train & ev


def test_caption_and_canonical_labels():
    s = W.Spec((W.Obj("red", "circle", "medium"), W.Obj("blue", "square", "medium")), "gray", relation="right of")
    assert s.caption() == "a red circle right of a blue square on a gray background"
    c = s.canonical()
    # canonical slot a is the LEFT object: the blue square
    assert (c["layout"], c["a_colour"], c["a_shape"], c["b_colour"], c["b_shape"]) == ("horizontal", "blue", "square", "red", "circle")
    one = W.Spec((W.Obj("green", "triangle", "small"),), "white", position="top")
    assert one.caption() == "a small green triangle at the top on a white background"
    assert W.label_indices(one)["b_colour"] == -1


def test_render_puts_colour_where_the_caption_says():
    spec = W.Spec((W.Obj("red", "square", "large"),), "black", position="left")
    img = R.render(spec, 0).astype(int)
    left, right = img[:, :12], img[:, 24:]
    red = lambda a: ((a[..., 0] > 150) & (a[..., 1] < 90)).sum()  # noqa: E731
    assert red(left) > 40 and red(right) == 0


def test_every_grammar_word_is_one_token(tmp_path):
    from tlcm.shapes.tokenizer import write_tokenizer

    tok = write_tokenizer(W.words(), tmp_path / "a", 24)
    tok2 = write_tokenizer(W.words(), tmp_path / "b", 24)
    caption = W.sample_specs(1, 1, "train")[0].caption()
    ids = tok(caption).input_ids
    assert len(ids) == len(caption.split()) + 2  # BOS + one per word + EOS
    assert ids == tok2(caption).input_ids  # deterministic vocabulary
    assert (tmp_path / "a" / "vocab.json").read_text() == (tmp_path / "b" / "vocab.json").read_text()
    assert tok.unk_token_id not in ids[1:-1]  # (unk is also EOS, as in CLIP)


def test_mirrored_spec_exchanges_only_the_direction_words():
    two = W.Spec((W.Obj("red", "circle", "medium"), W.Obj("blue", "square", "medium")), "gray", relation="left of")
    m = two.mirrored()
    assert m.caption() == "a red circle right of a blue square on a gray background"
    assert m.mirrored() == two
    a, b = two.canonical(), m.canonical()  # the same objects, in exchanged canonical slots
    assert (a["a_colour"], a["b_colour"]) == (b["b_colour"], b["a_colour"]) and a["layout"] == b["layout"]
    one = W.Spec((W.Obj("green", "triangle", "small"),), "white", position="top")
    assert one.mirrored().position == "bottom" and one.mirrored().caption().endswith("at the bottom on a white background")
    centre = W.Spec((W.Obj("green", "triangle", "small"),), "white", position="center")
    assert centre.mirrored() == centre
