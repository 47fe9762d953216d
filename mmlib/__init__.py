"""mmlib: the small library behind the any-to-any multimodal course.

One module per idea of the course notes' loss decomposition. This foundation holds
`mmlib.config` (device, scale, seed), `mmlib.data` (the generated world) and `mmlib.zoo`
(the cache of trained tiny components that later lessons load).
"""

__version__ = "0.1.0"

# Where the course lives; Colab badges and the notebooks' setup cells point here.
REPOSITORY = "multimodal-course/any-to-any"
REPOSITORY_URL = f"https://github.com/{REPOSITORY}"

# Modules that register zoo entries and config sections, in lesson order; imported on demand by
# `mmlib.zoo` and `mmlib.config` so that `import mmlib` stays light.
LESSON_MODULES = ("mmlib.tokenizer", "mmlib.clip", "mmlib.imagebind", "mmlib.judge", "mmlib.decoders", "mmlib.llm",
                  "mmlib.input_projection", "mmlib.output_projection", "mmlib.instruction", "mmlib.train",
                  "mmlib.regimes")
