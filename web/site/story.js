// The book's model in the page: llama.cpp compiled to WebAssembly (wllama) continues the
// reader's story greedily, in this tab, from a GGUF file beside the page. llama.cpp tokenizes
// the text with the vocabulary stored in that file, as `slmlab generate` does with the file's
// tokenizer; the browser tests check that both choose the same tokens.
import { Wllama } from '../wllama/index.js';

const here = new URL('.', import.meta.url);

async function attach(box) {
  const [prompt, button, count, out, speed] = ['textarea', 'button', 'input', '.slmlab-story-out',
    '.slmlab-story-speed'].map((s) => box.querySelector(s));
  const model = new URL(box.dataset.model, location.href).href;
  const wllama = new Wllama({ default: new URL('../wllama/wllama.wasm', here).href },
    { suppressNativeLog: true });
  await wllama.loadModelFromUrl(model, { n_ctx: 512, n_threads: 1 });

  // Greedy continuation: the text, the chosen token ids, and the decoding speed.
  box.complete = async (text, maxTokens) => {
    const start = performance.now();
    const result = await wllama.createCompletion({
      prompt: text, max_tokens: maxTokens, temperature: 0, logprobs: 1,
    });
    const seconds = (performance.now() - start) / 1000;
    const choice = result.choices[0];
    const ids = choice.logprobs.content.map((step) => step.id);
    return { text: choice.text, ids, seconds, tokensPerSecond: ids.length / seconds };
  };

  button.addEventListener('click', async () => {
    button.disabled = true;
    const result = await box.complete(prompt.value, Number(count.value));
    out.textContent = '';
    const start = document.createElement('span');
    start.textContent = prompt.value;
    const added = document.createElement('strong');
    added.textContent = result.text;
    out.append(start, added);
    out.dataset.ids = JSON.stringify(result.ids);
    speed.textContent = `${result.ids.length} tokens in ${result.seconds.toFixed(2)} s ` +
      `(${result.tokensPerSecond.toFixed(0)} tokens/s, one thread of this browser)`;
    button.disabled = false;
  });
  button.textContent = 'Continue the story';
  button.disabled = false;
  box.dataset.ready = 'true';
}

for (const box of document.querySelectorAll('.slmlab-story')) {
  attach(box).catch((error) => {
    box.querySelector('button').textContent = `could not load the model: ${error.message}`;
    throw error;
  });
}
