"""Special tokens shared by the text tokenizer, the collator and the model.

Images never appear as magic negative ids: understanding images occupy ``IMAGE_PAD`` slots
and generated images ``GEN_PAD`` slots, both real vocabulary entries whose embeddings are
replaced by projected image features inside the model (nanoVLM style).
"""
IMAGE_MARKER = "<image>"  # how an image is written inside LLaVA-schema conversation text

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_TURN = "<|end|>"
IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
IMAGE_PAD = "<|image_pad|>"  # understanding-input slot (labels ignored)
GEN_PAD = "<|gen_pad|>"  # generation slot (text labels ignored, image-code labels used)

SPECIAL_TOKENS = [BOS, EOS, PAD, UNK, USER, ASSISTANT, END_TURN, IMAGE_START, IMAGE_END, IMAGE_PAD, GEN_PAD]
IGNORE_INDEX = -100
