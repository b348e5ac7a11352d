"""Text classifier example, one command: train a tiny BERT sentiment classifier on generated sentences,
build its gradient index from the JSONL training file, serve it on 127.0.0.1, query it by raw text,
print the most and least similar training sentences (labels, scores), and explain one prediction
with AnchorText on the same served model.

    python examples/text_classifier/run.py [--workdir /tmp/gradindex-text] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns {"targets", "anchor", "precision", "coverage"} (the tests check them)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/gradindex-text")
    ap.add_argument("--quick", action="store_true", help="fewer sentences and a shorter max_length")
    ap.add_argument("--k", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from indexer.build import build_index
    from indexer.text_demo import make_classifier_dir
    from server.app import GradIndexServer
    from server.client import GradIndexClient
    from server.config import ServerConfig
    from server.protos import service_pb2 as pb

    wd = Path(args.workdir)
    T = 32 if args.quick else 64
    info = make_classifier_dir(wd / "model", n_train=200 if args.quick else 600, epochs=6, hidden=32, layers=2,
                               max_length=T)
    print(f"trained a BERT classifier (2 layers, hidden 32) on {len(info['texts'])} sentences: "
          f"train accuracy {info['accuracy']:.2f}")
    cfg = {"model": {"name": "sentiment", "hf_dir": info["dir"], "hf_kind": "sequence_classification",
                     "class_names": ["negative", "positive"], "text": {"max_length": T},
                     # the encoder's weights: the classifier head's gradient is one shared direction per class
                     "params": ["^hf\\.bert\\.(embeddings|encoder)\\."]},
           "data": {"format": "jsonl", "path": info["dir"] + "/train.jsonl", "id_field": "id"},
           "index": {"name": "sentiment", "kernel": "grad_cos", "faiss": "flat"},
           "projection": {"kind": "sketch", "dim": 2048}}
    shutil.rmtree(wd / "index", ignore_errors=True)
    r = build_index(cfg, wd / "index")
    print(f"built index {r.name!r}: {r.count} sentences, {r.dim} dims, {r.seconds:.1f} s")
    srv = GradIndexServer(ServerConfig(workdir=str(wd / "index"), indexes=["sentiment"], port=0)).start()
    try:
        c = GradIndexClient(f"127.0.0.1:{srv.port}")
        queries = ["the film was really wonderful", "the plot was dull and the acting was awful"]
        res = c.find_similar("sentiment", texts=queries, k=args.k, direction="both", include_data=True)
        names = ["negative", "positive"]
        for q, text in enumerate(queries):
            print(f"\nquery {text!r} -> predicted {names[int(res.targets[q])]}")
            for title, hits in (("most similar (proponents)", res.most), ("least similar (opponents)", res.least)):
                print(f"  {title}:")
                for s, lab, t in zip(hits.scores[q], hits.labels[q], hits.texts[q]):
                    print(f"    {s:+.4f}  [{names[lab]}]  {t}")
        # The negative review: AnchorText perturbs by replacing words with [UNK], and this model calls
        # a sentence of [UNK]s positive, so a positive prediction needs no word (an empty anchor, the
        # prediction holds whatever is dropped) while a negative one hinges on its negative words.
        a = c.stub.ExplainAnchors(pb.ExplainAnchorsRequest(model="sentiment", kind="text", text=queries[1]))
        print(f"\nAnchorText on the served model for {queries[1]!r} (predicted {names[int(res.targets[1])]}): "
              f"anchor {list(a.anchor)} (precision {a.precision:.2f}, coverage {a.coverage:.2f})")
        return {"targets": [int(t) for t in res.targets], "anchor": list(a.anchor), "precision": a.precision,
                "coverage": a.coverage}
    finally:
        srv.stop(0)


if __name__ == "__main__":
    main()
