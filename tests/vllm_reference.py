"""What vLLM's own offline API generates, for comparison with wcd.

    python tests/vllm_reference.py SPEC.json  -> JSON on stdout

SPEC: {"models": {name: {"path", "engine_args"}}, "prompts": [...],
       "chats": [[messages...], ...], "sampling": {...},
       "embeddings": [{"input": text or token ids, "pooling": {...},
                       "tokenization": {...}}, ...]}.
Each prompt and chat is generated alone (its own generate/chat call), so
batch composition cannot change the numbers; a model with `runner: pooling`
embeds each of "embeddings" alone instead (LLM.embed, with those
PoolingParams fields and tokenization kwargs). Nothing from wcd is imported:
this is plain vLLM, the reference.
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    spec = json.load(open(sys.argv[1]))
    results = {}
    for name, model in spec["models"].items():
        llm = LLM(model=model["path"], **model["engine_args"])
        if model["engine_args"].get("runner") == "pooling":
            results[name] = {"embeddings": [_embedding(llm, case)
                                            for case in spec["embeddings"]]}
        else:
            params = SamplingParams(**spec["sampling"])
            results[name] = {
                "prompts": [_tokens(llm.generate([prompt], params, use_tqdm=False))
                            for prompt in spec.get("prompts", [])],
                "chats": [_tokens(llm.chat(messages, params, use_tqdm=False))
                          for messages in spec.get("chats", [])],
            }
        del llm
    print("WCD-REFERENCE " + json.dumps(results))


def _embedding(llm, case: dict) -> dict:
    from vllm import PoolingParams

    given = case["input"]
    prompt = given if isinstance(given, str) else {"prompt_token_ids": given}
    (output,) = llm.embed([prompt], pooling_params=PoolingParams(**case.get("pooling", {})),
                          tokenization_kwargs=case.get("tokenization"), use_tqdm=False)
    return {"embedding": list(output.outputs.embedding),
            "prompt_tokens": len(output.prompt_token_ids)}


def _tokens(outputs) -> dict:
    completion = outputs[0].outputs[0]
    return {"token_ids": list(completion.token_ids), "text": completion.text}


if __name__ == "__main__":
    main()
