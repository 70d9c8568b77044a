"""``python -m hessrank.demo``: the printed summary is computed from the table; the flags."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hessrank import demo
from hessrank.analysis.inference import CLIENT_SERVER_COLUMNS, client_vs_server_summary


def _table() -> pd.DataFrame:
    """Round 0: every client below the server; round 5: every client above; round 10: mixed."""
    rows = []
    clients = {0: [5.0, 6.0, 7.0], 5: [30.0, 40.0, 50.0], 10: [9.0, 11.0, 10.0]}
    servers = {0: 20.0, 5: 10.0, 10: 10.0}
    for r in (0, 5, 10):
        rows.append({"round": r, "subject_kind": "server", "quantity": "stable-rank",
                     "value": servers[r], "stderr": 0.1})
        for v in clients[r]:
            rows.append({"round": r, "subject_kind": "client", "quantity": "stable-rank",
                         "value": v, "stderr": 0.1})
        rows.append({"round": r, "subject_kind": "subset", "quantity": "stable-rank",
                     "value": 2 * servers[r], "stderr": 0.1})
        rows.append({"round": r, "subject_kind": "server", "quantity": "top-eig",
                     "value": 1.0, "stderr": 0.0})
    return pd.DataFrame(rows)


def test_summary_is_computed_from_the_table():
    metrics = pd.DataFrame({"round": [0, 10], "test_accuracy": [0.1, 0.8765]})
    per_round, text = demo.summarize(_table(), metrics)
    assert per_round["round"].tolist() == [0, 5, 10]
    assert per_round["verdict"].tolist() == ["client < server", "client > server", "mixed"]
    np.testing.assert_allclose(per_round["ratio"], [0.3, 4.0, 1.0])
    # the one summary shared with the figures and notebooks, plus the demo's two columns
    pd.testing.assert_frame_equal(per_round[CLIENT_SERVER_COLUMNS],
                                  client_vs_server_summary(_table()))
    np.testing.assert_allclose(per_round["subset50_mean"], [40.0, 20.0, 20.0])
    assert set(demo.SHOWN) <= set(per_round.columns)
    assert "test accuracy 0.876" in text and "0.30–4.00×" in text
    assert "above the server at rounds 5" in text and "below at rounds 0" in text
    assert "(mixed: 10)" in text and "averaged 2.00×" in text
    assert "does not hold along the whole trajectory" in text


def test_flags(capsys):
    args = demo.build_parser().parse_args(["--fast"])
    assert args.fast and args.threads == 1 and args.seed == 0
    with pytest.raises(SystemExit) as exc:
        demo.main(["--threads", "0"])
    assert exc.value.code == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--fats"])
    assert "did you mean --fast?" in capsys.readouterr().err
