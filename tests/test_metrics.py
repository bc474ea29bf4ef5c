import pytest

from comi_hf.metrics import best_exact_match, best_f1, exact_match, normalize_answer, token_f1


def test_squad_normalisation():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize_answer("an apple and a pear") == "apple and pear"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_f1_exact_values():
    assert exact_match("The answer.", "answer") == 1.0
    assert exact_match("answers", "answer") == 0.0
    # prediction "red river code" vs reference "code of the red river": shared {red, river, code} = 3
    # precision 3/3, recall 3/4 -> F1 = 2 * 1 * 0.75 / 1.75
    assert token_f1("red river code", "code of the red river") == pytest.approx(1.5 / 1.75)
    assert token_f1("nothing shared", "code") == 0.0
    assert token_f1("", "code") == 0.0


def test_best_reference_wins():
    references = ["4821", "four eight two one", "the code 4821"]
    assert best_exact_match("4821", references) == 1.0
    assert best_f1("code 4821", references) == 1.0
    assert best_f1("eight two", references) == pytest.approx(2 * 1 * 0.5 / 1.5)
