"""Model loading: the embedded default (offline), random test models, and any HF hub id or local directory.

```python
from peftbench.models import load_model, ModelSpec
model, tokenizer = load_model(cfg.model)
```
"""

from peftbench.models.embedded import EMBEDDED, cache_root, model_dir, tokenizer_dir
from peftbench.models.loading import load_model
from peftbench.models.params import count_parameters, parameter_bytes
from peftbench.models.spec import ARCHITECTURES, DTYPES, ModelSpec
from peftbench.models.tiny import RANDOM_PRESETS

__all__ = [
    "ARCHITECTURES",
    "DTYPES",
    "EMBEDDED",
    "RANDOM_PRESETS",
    "ModelSpec",
    "cache_root",
    "count_parameters",
    "load_model",
    "model_dir",
    "parameter_bytes",
    "tokenizer_dir",
]
