"""Model code: the decoder-only transformer, batched sampling, LoRA, tokenizers, Hugging Face
import and export, and the evaluation every method is judged by."""
