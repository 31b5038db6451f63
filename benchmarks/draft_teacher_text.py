"""Teacher outputs for distilling a speculative draft (docs/compress.md): chat-templated prompts of the
bench's three kinds (story/explanation chat, passage summaries, code edits) with prompts and passages the bench
does not use, answered by the teacher at temperature 0.7.

    python benchmarks/draft_teacher_text.py MODEL OUT.txt N_PER_KIND [THREADS]
"""
import os
import sys
from scaleinfer import LLM, SamplingParams

model, out_path, n_per = sys.argv[1], sys.argv[2], int(sys.argv[3])
threads = int(sys.argv[4]) if len(sys.argv) > 4 else 1
shakes = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "shakespeare-en.txt"), encoding="utf-8").read()
topics = ["a robot learning to paint", "a village that loses its river", "two friends lost in a desert",
          "a baker who can taste memories", "a dragon afraid of fire", "the first day at a new school",
          "a clock that runs backwards", "a sailor and a talking whale", "a city where it never rains",
          "a detective cat", "a garden on the moon", "a musician who lost her voice", "an old map",
          "a train that never stops", "a child who befriends a storm", "a library with no books"]
questions = ["Explain how photosynthesis works.", "What are the benefits of regular exercise?",
             "Describe the water cycle.", "How does a computer store information?", "Why is the sky blue?",
             "Give tips for learning a new language.", "Explain what a black hole is.",
             "How do vaccines work?", "What makes a good leader?", "Describe how bread is made."]
snippets = ["def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n",
            "class Counter:\n    def __init__(self):\n        self.n = 0\n\n    def inc(self):\n        self.n += 1\n        return self.n\n",
            "import os\n\ndef list_files(path):\n    out = []\n    for name in os.listdir(path):\n        if os.path.isfile(os.path.join(path, name)):\n            out.append(name)\n    return out\n",
            "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n"]
prompts = []
for i in range(n_per):
    prompts.append(f"Write a short story about {topics[i % len(topics)]}.")
    prompts.append(questions[i % len(questions)])
    start = 6000 + 1900 * i
    prompts.append("Summarize this passage, quoting its key lines:\n\n" + shakes[start:start + 1800])
    s = snippets[i % len(snippets)]
    prompts.append("Add type hints and a docstring to every function in this file. Reply with the whole "
                   "updated file only.\n\n```python\n" + s + "```")
llm = LLM(model, threads=threads)
texts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
rendered = [llm.tokenizer.encode(t, add_special_tokens=False) for t in texts]
outs = llm.generate(rendered, SamplingParams(temperature=0.7, top_p=0.95, max_tokens=256, seed=1))
with open(out_path, "w", encoding="utf-8") as f:
    for r, o in zip(texts, outs):
        f.write(r + o.outputs[0].text + "\n\n")
print("wrote", out_path, len(outs))
