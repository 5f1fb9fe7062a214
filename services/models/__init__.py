"""Model work shared by the services: inference engines and prompt rendering (``engines``),
episodes over environments (``episodes``), tiny models built from scratch (``tiny``),
checkpoint manifests and their verification before loading (``manifest``), and importing
pretrained models into the store's format (``gguf``). Generator, trainer and gate import
these, never each other."""
