"""What happens after compression: serving with vLLM (`serve`), benchmark evaluation (`evaluation`), the model
card (`card`) and the Hub upload (`hub`). Reads only checkpoint folders; never reaches into the method."""
