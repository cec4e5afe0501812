"""The small-Llama pretraining shared by the LLM benchmarks (benchmarks/pretrain.py).

Needs ``apt-get install -y wordnet-base fortunes``; skips without, except under CI.
"""

import math
import os

import pytest

from benchmarks import pretrain
from benchmarks.pretrain import (
    TINY,
    debian_corpus,
    heldout_loss,
    pretrained_llama,
    split_corpus,
    train_tokenizer,
)

MISSING = not (pretrain.WORDNET / "data.noun").exists() or not pretrain.FORTUNES_LIST.exists()
pytestmark = pytest.mark.skipif(MISSING and not os.environ.get("CI"),
                                reason="needs apt packages wordnet-base fortunes")


@pytest.fixture(scope="module")
def corpus():
    return debian_corpus()


def test_corpus_is_english_text_in_a_fixed_order(corpus):
    assert len(corpus) > 100_000
    assert corpus == debian_corpus()
    assert corpus[0].startswith("entity: that which is perceived")
    assert any("Zippy" in document for document in corpus[-2000:])  # fortunes follow WordNet


def test_missing_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrain, "WORDNET", tmp_path / "wordnet")
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        debian_corpus()


def test_split_is_seeded_and_disjoint(corpus):
    train, heldout = split_corpus(corpus, seed=3)
    assert (train, heldout) == split_corpus(corpus, seed=3)
    assert split_corpus(corpus, seed=4)[1] != heldout
    assert len(heldout) == round(0.05 * len(corpus))
    assert sorted(train + heldout) == sorted(corpus)
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_corpus(corpus, seed=0, heldout_fraction=1.0)


def test_tokenizer_round_trips_and_splits_digits(corpus):
    tokenizer = train_tokenizer(corpus[:5000], vocab_size=600)
    text = "Antonym of happy: sad. 4071 + 389 = 4460"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert [tokenizer.decode([token]) for token in ids[-4:]] == ["4", "4", "6", "0"]
    assert len(tokenizer) == 600


def test_pretraining_learns_and_is_cached(corpus, tmp_path):
    train, heldout = split_corpus(corpus[:4000], seed=0)
    trained = pretrained_llama(tmp_path, 0, TINY, 150, documents=train, batch_size=16)
    untrained = pretrained_llama(tmp_path, 0, TINY, 0, documents=train)
    assert trained != untrained
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(trained)
    config = model.config
    assert (config.num_key_value_heads, config.tie_word_embeddings) == (TINY.kv_heads, False)
    assert len(AutoTokenizer.from_pretrained(trained)) == TINY.vocab
    # An untrained model predicts about uniformly: log(vocab); 150 steps must beat it clearly.
    before, after = heldout_loss(untrained, heldout), heldout_loss(trained, heldout)
    assert before == pytest.approx(math.log(TINY.vocab), abs=0.3)
    assert after < before - 1.0
    stamp = (trained / "model.safetensors").stat().st_mtime_ns
    assert pretrained_llama(tmp_path, 0, TINY, 150, documents=train, batch_size=16) == trained
    assert (trained / "model.safetensors").stat().st_mtime_ns == stamp
