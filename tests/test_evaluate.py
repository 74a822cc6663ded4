from adapters.evaluate import error_rates, markdown_table, normalize, summarize


def test_thai_keeps_its_vowel_and_tone_marks() -> None:
    assert normalize("ขอบคุณ ครับ!", "th") == "ขอบคุณ ครับ"
    assert error_rates(["ขอบคุณ"], ["ขอบคุณ"], "th")["cer"] == 0.0
    assert error_rates(["ขอบคุณ"], ["ขอบคณ"], "th")["cer"] > 0.0  # a dropped mark is an error


def test_spaced_language_wer_and_cer() -> None:
    rates = error_rates(["the cat sat"], ["The cat, sat!"], "en")
    assert rates["wer"] == 0.0 and rates["cer"] == 0.0
    rates = error_rates(["the cat sat"], ["the bat sat"], "en")
    assert abs(rates["wer"] - 1 / 3) < 1e-9 and abs(rates["cer"] - 1 / 11) < 1e-9
    assert rates["primary"] == rates["wer"]


def test_unspaced_languages_ignore_spaces_and_use_cer() -> None:
    rates = error_rates(["ありがとう"], ["あり がとう"], "ja")
    assert rates["cer"] == 0.0 and rates["wer"] is None and rates["primary"] == 0.0


def test_summary_tiers_and_lid() -> None:
    entries = [{"language": "en", "text": "a b", "duration": 2.5}, {"language": "ar", "text": "ب", "duration": 1.0},
               {"language": "it", "text": "c", "duration": 3.0}]
    report = summarize(entries, {0: "a b", 1: "ت", 2: "c"}, {0: True, 1: False, 2: True}, min_lid_seconds=2.0)
    assert report["tiers"]["high"]["cer"] == 0.0 and report["tiers"]["low"]["cer"] == 1.0
    assert report["lid_accuracy_long"] == 1.0 and abs(report["lid_accuracy"] - 2 / 3) < 1e-9
    assert "| en | high |" in markdown_table(report, "t")
