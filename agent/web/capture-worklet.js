// AudioWorklet: hands the microphone's first channel to the page in ~40 ms blocks
// (posting every 128-sample render quantum would flood the main thread).
class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(2048);
    this.used = 0;
    // "flush" on release: the last partial block belongs to the utterance too.
    this.port.onmessage = (e) => {
      if (e.data === "flush") {
        this.port.postMessage({ flushed: this.block.slice(0, this.used) });
        this.used = 0;
      }
    };
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      let i = 0;
      while (i < channel.length) {
        const n = Math.min(channel.length - i, this.block.length - this.used);
        this.block.set(channel.subarray(i, i + n), this.used);
        this.used += n;
        i += n;
        if (this.used === this.block.length) {
          this.port.postMessage(this.block.slice(0));
          this.used = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("capture", CaptureProcessor);
