"""Templates, the loss mask at exact token positions, the truncation policy, and the collator."""
import pytest
import torch

from slm_llm.data import (Collator, Record, cut_prompt, query_text, render_prompt, render_response,
                          tokenize_example, tokenize_prompt)
from slm_llm.data.tokenize import IGNORE_INDEX, MIN_PROMPT_TOKENS

REC = Record(instruction="Classify the sentiment.", input="The shares rose 5%.", output="positive", task="fin")
NO_INPUT = Record(instruction="Name a prime number.", input="", output="7", task="math")


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --- templates --------------------------------------------------------------------------------

def test_alpaca_prompts_are_the_stanford_ones(smol_tokenizer):
    assert render_prompt(REC, "alpaca", smol_tokenizer) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nClassify the sentiment."
        "\n\n### Input:\nThe shares rose 5%.\n\n### Response:\n")
    assert render_prompt(NO_INPUT, "alpaca", smol_tokenizer) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a prime number.\n\n### Response:\n")
    assert render_response(REC, smol_tokenizer, "alpaca") == "positive<|im_end|>"


def test_llama2_prompt(smol_tokenizer):
    prompt = render_prompt(REC, "llama2", smol_tokenizer)
    assert prompt.startswith("[INST] <<SYS>>\n") and "\n<</SYS>>\n\n" in prompt
    assert prompt.endswith("Classify the sentiment.\n\nThe shares rose 5%. [/INST]")
    assert render_response(REC, smol_tokenizer, "llama2") == " positive <|im_end|>"


def test_chat_template_is_chatml_with_one_user_turn(smol_tokenizer):
    prompt = render_prompt(REC, "chat", smol_tokenizer)
    assert "<|im_start|>user\nClassify the sentiment.\n\nThe shares rose 5%.<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert render_response(REC, smol_tokenizer, "chat") == "positive<|im_end|>"
    assert "user\nName a prime number.<|im_end|>" in render_prompt(NO_INPUT, "chat", smol_tokenizer)


def test_bos_is_written_when_the_tokenizer_adds_one(smol_tokenizer):
    import copy

    class AddsBos:  # a Llama-like tokenizer: adds BOS by default
        bos_token, bos_token_id, eos_token = "<s>", 1, "</s>"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([1] if add_special_tokens else []) + [5] * len(text)}

    assert render_prompt(REC, "llama2", AddsBos()).startswith("<s>[INST] <<SYS>>")
    assert render_prompt(REC, "alpaca", AddsBos()).startswith("<s>Below is")
    assert not render_prompt(REC, "alpaca", copy.deepcopy(smol_tokenizer)).startswith("<|im_start|>")


def test_unknown_template_and_missing_chat_template(smol_tokenizer):
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        render_prompt(REC, "vicuna", smol_tokenizer)
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has none"):
        render_prompt(REC, "chat", tok)


def test_query_text_is_the_user_turn():
    assert query_text(REC) == "Classify the sentiment.\n\nThe shares rose 5%."
    assert query_text(NO_INPUT) == "Name a prime number."


# --- loss mask --------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["alpaca", "llama2", "chat"])
def test_labels_mask_exactly_the_prompt(smol_tokenizer, template):
    tok = smol_tokenizer
    prompt = _ids(tok, render_prompt(REC, template, tok))
    response = _ids(tok, render_response(REC, tok, template))
    ex = tokenize_example(REC, tok, template, max_length=512)
    assert ex["input_ids"] == prompt + response
    assert ex["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex["labels"][len(prompt):] == response
    assert ex["labels"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    expected = {"alpaca": "positive<|im_end|>", "llama2": " positive <|im_end|>", "chat": "positive<|im_end|>"}
    assert tok.decode(ex["labels"][len(prompt):]) == expected[template]


# --- truncation -------------------------------------------------------------------------------

LONG = Record(instruction="Summarise the report.", input=" ".join(f"word{i}" for i in range(400)),
              output="It is long.", task="t")


@pytest.mark.parametrize("truncation", ["middle", "left"])
def test_overlong_prompt_is_cut_and_response_kept(smol_tokenizer, truncation):
    tok = smol_tokenizer
    prompt = _ids(tok, render_prompt(LONG, "chat", tok))
    response = _ids(tok, render_response(LONG, tok, "chat"))
    ex = tokenize_example(LONG, tok, "chat", max_length=64, truncation=truncation)
    assert len(ex["input_ids"]) == 64 == len(ex["labels"])
    room = 64 - len(response)
    assert ex["input_ids"][room:] == response and ex["labels"][room:] == response
    assert ex["labels"][:room] == [IGNORE_INDEX] * room
    kept = ex["input_ids"][:room]
    if truncation == "middle":
        head = room // 2
        assert kept[:head] == prompt[:head]  # system text and the start of the instruction
        assert kept[head:] == prompt[-(room - head):]  # end of input and the generation cue
    else:
        assert kept == prompt[-room:]
    assert tok.decode(kept).endswith("<|im_start|>assistant\n")


def test_overlong_response_keeps_some_prompt_and_cuts_its_tail(smol_tokenizer):
    tok = smol_tokenizer
    rec = Record(instruction="Write a lot.", input="", output=" ".join(["blah"] * 200), task="t")
    response = _ids(tok, render_response(rec, tok, "chat"))
    ex = tokenize_example(rec, tok, "chat", max_length=48)
    assert len(ex["input_ids"]) == 48
    n_prompt = ex["labels"].count(IGNORE_INDEX)
    assert n_prompt == MIN_PROMPT_TOKENS
    assert ex["labels"][n_prompt:] == response[: 48 - MIN_PROMPT_TOKENS]


def test_short_example_is_not_cut(smol_tokenizer):
    ex = tokenize_example(REC, smol_tokenizer, "chat", max_length=512)
    ex_tight = tokenize_example(REC, smol_tokenizer, "chat", max_length=len(ex["input_ids"]))
    assert ex_tight == ex


def test_cut_prompt_and_tokenize_prompt(smol_tokenizer):
    ids = list(range(10))
    assert cut_prompt(ids, 20) == ids
    assert cut_prompt(ids, 5, "middle") == [0, 1, 7, 8, 9]
    assert cut_prompt(ids, 5, "left") == [5, 6, 7, 8, 9]
    p = tokenize_prompt(LONG, smol_tokenizer, "chat", max_length=64, reserve=16)
    assert len(p) == 48 and smol_tokenizer.decode(p).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unknown truncation"):
        tokenize_example(REC, smol_tokenizer, "chat", 64, truncation="right")


# --- collator ---------------------------------------------------------------------------------

def test_collator_pads_right_and_stacks_extras():
    feats = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "slot_ids": [0, 1], "slot_weights": [0.5, 0.5],
         "task_id": 2, "id": "a"},
        {"input_ids": [8], "labels": [8], "slot_ids": [2, 3], "slot_weights": [1.0, 0.0], "task_id": 3, "id": "b"},
    ]
    b = Collator(pad_token_id=0)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["slot_ids"].dtype == torch.long and b["slot_ids"].tolist() == [[0, 1], [2, 3]]
    assert b["slot_weights"].dtype == torch.float32 and b["slot_weights"].shape == (2, 2)
    assert b["task_id"].tolist() == [2, 3]
    assert b["id"] == ["a", "b"]


def test_collator_pad_to_multiple_and_ragged_extras():
    b = Collator(pad_token_id=9, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3], "extra": [1]},
                                                        {"input_ids": [1], "extra": [1, 2]}])
    assert b["input_ids"].shape == (2, 8) and b["input_ids"][1, 1:].eq(9).all()
    assert "labels" not in b
    assert b["extra"] == [[1], [1, 2]]
    with pytest.raises(ValueError):
        Collator(pad_token_id=None)
