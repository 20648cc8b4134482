"""What vLLM's own offline API generates, for comparison with wcd.

    python tests/vllm_reference.py SPEC.json  -> JSON on stdout

SPEC: {"models": {name: {"path", "engine_args"}}, "prompts": [...],
       "chats": [[messages...], ...], "sampling": {...}}.
Each prompt and chat is generated alone (its own generate/chat call), so
batch composition cannot change the numbers. Nothing from wcd is imported:
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
        params = SamplingParams(**spec["sampling"])
        results[name] = {
            "prompts": [_tokens(llm.generate([prompt], params, use_tqdm=False))
                        for prompt in spec.get("prompts", [])],
            "chats": [_tokens(llm.chat(messages, params, use_tqdm=False))
                      for messages in spec.get("chats", [])],
        }
        del llm
    print("WCD-REFERENCE " + json.dumps(results))


def _tokens(outputs) -> dict:
    completion = outputs[0].outputs[0]
    return {"token_ids": list(completion.token_ids), "text": completion.text}


if __name__ == "__main__":
    main()
