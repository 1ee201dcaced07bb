// voice-agent kiosk: plays the daemon's spoken replies from /ws/tts, gaplessly (Web Audio).
// Each PCM chunk becomes an AudioBuffer scheduled to start exactly where the previous one
// ends; `tts.abort` (barge-in) stops everything at once. The AudioContext runs at 16 kHz, the
// PCM's own rate, so the chunks are joined before the one resampler to the device, not
// resampled one by one. Counters and a level meter are in `window.voiceAgentPlayer.stats`.
"use strict";

(() => {
  const PARAMS = new URLSearchParams(location.search);
  const TOKEN = PARAMS.get("token");
  const LEAD_S = 0.05; // the first chunk starts this far ahead: room for network jitter
  const METER_MS = 50;

  function ttsUrl() {
    const url = new URL("/ws/tts", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (TOKEN) url.searchParams.set("token", TOKEN);
    return url.toString();
  }

  function badge() {
    let b = document.getElementById("tts");
    if (!b) {
      b = document.createElement("span");
      b.id = "tts";
      b.title = "the daemon's spoken replies on this page";
      const header = document.querySelector("header");
      if (header) header.append(b);
    }
    return b;
  }

  function setBadge(state, text) {
    const b = badge();
    b.className = "badge " + (state === "speaking" ? "open" : state === "blocked" ? "off" : "closed");
    b.dataset.state = state;
    b.textContent = text;
  }

  class ReplyPlayer {
    constructor() {
      this.stats = {
        connected: false, replies: 0, chunks: 0, samples: 0, played: 0, ended: 0, aborts: 0,
        underruns: 0, peak: 0, level: 0, active: 0, lastReplyId: null, lastDurationS: 0,
        sampleRate: 0,
      };
      this.ctx = null;
      this.sources = new Set();
      this.nextTime = 0;
      this.startTime = 0;
      this.rate = 16000;
      this.endPending = false;
      this.backoff = 500;
      this.meter = null;
    }

    context() {
      if (!this.ctx) {
        try {
          this.ctx = new AudioContext({ sampleRate: this.rate, latencyHint: "interactive" });
        } catch (e) {
          this.ctx = new AudioContext(); // a browser that cannot run at 16 kHz resamples
        }
        this.gain = this.ctx.createGain();
        this.analyser = this.ctx.createAnalyser();
        this.analyser.fftSize = 1024;
        this.gain.connect(this.analyser);
        this.analyser.connect(this.ctx.destination);
        this.stats.sampleRate = this.ctx.sampleRate;
        this.startMeter();
      }
      if (this.ctx.state === "suspended") this.ctx.resume().catch(() => {});
      return this.ctx;
    }

    connect() {
      const ws = new WebSocket(ttsUrl());
      ws.binaryType = "arraybuffer";
      ws.onopen = () => {
        this.backoff = 500;
        this.stats.connected = true;
      };
      ws.onmessage = (m) => this.onMessage(m.data);
      ws.onclose = () => {
        this.stats.connected = false;
        this.abort(false);
        setTimeout(() => this.connect(), this.backoff);
        this.backoff = Math.min(this.backoff * 2, 10000);
      };
      this.ws = ws;
    }

    onMessage(data) {
      if (data instanceof ArrayBuffer) {
        this.onAudio(new Int16Array(data));
        return;
      }
      const msg = JSON.parse(data);
      if (msg.type === "tts.start") this.onStart(msg);
      else if (msg.type === "tts.audio") this.onAudio(base64Pcm(msg.data));
      else if (msg.type === "tts.end") this.onEnd();
      else if (msg.type === "tts.abort") this.abort(true);
      else if (msg.type === "tts.ready") setBadge("idle", "speaker idle");
    }

    onStart(msg) {
      this.abort(false); // a new reply supersedes whatever still plays
      this.rate = msg.sample_rate || 16000;
      this.stats.replies += 1;
      this.stats.lastReplyId = msg.reply_id;
      this.nextTime = 0;
      this.endPending = false;
      const ctx = this.context();
      setBadge(ctx.state === "running" ? "speaking" : "blocked",
        ctx.state === "running" ? "speaking" : "sound blocked: click the page");
    }

    onAudio(pcm) {
      if (!pcm.length) return;
      const ctx = this.context();
      const x = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) x[i] = pcm[i] / 32768;
      const buf = ctx.createBuffer(1, x.length, this.rate);
      buf.copyToChannel(x, 0);
      const src = ctx.createBufferSource();
      src.buffer = buf;
      src.connect(this.gain);
      const now = ctx.currentTime;
      if (this.nextTime < now) {
        // The first chunk, or the network fell behind real time: start a little ahead.
        if (this.nextTime > 0) this.stats.underruns += 1;
        else this.startTime = now + LEAD_S;
        this.nextTime = now + LEAD_S;
      }
      src.start(this.nextTime);
      this.nextTime += buf.duration;
      this.sources.add(src);
      this.stats.active = this.sources.size;
      src.onended = () => {
        this.sources.delete(src);
        this.stats.active = this.sources.size;
        this.stats.played += x.length;
        if (this.endPending && !this.sources.size) this.finish();
      };
      this.stats.chunks += 1;
      this.stats.samples += x.length;
    }

    onEnd() {
      this.endPending = true;
      if (!this.sources.size) this.finish();
    }

    finish() {
      this.endPending = false;
      this.stats.ended += 1;
      if (this.ctx) this.stats.lastDurationS = this.ctx.currentTime - this.startTime;
      setBadge("idle", "speaker idle");
    }

    abort(counted) {
      for (const s of this.sources) {
        s.onended = null;
        try {
          s.stop();
        } catch (e) { /* not started yet */ }
        s.disconnect();
      }
      const had = this.sources.size > 0 || this.endPending;
      this.sources.clear();
      this.stats.active = 0;
      this.nextTime = 0;
      this.endPending = false;
      if (counted) this.stats.aborts += 1;
      if (had || counted) setBadge("idle", "speaker idle");
    }

    startMeter() {
      // What really reaches the output, measured after the gain: the page's own proof.
      const data = new Float32Array(this.analyser.fftSize);
      this.meter = setInterval(() => {
        this.analyser.getFloatTimeDomainData(data);
        let peak = 0;
        for (let i = 0; i < data.length; i++) peak = Math.max(peak, Math.abs(data[i]));
        this.stats.level = peak;
        this.stats.peak = Math.max(this.stats.peak, peak);
      }, METER_MS);
    }
  }

  function base64Pcm(b64) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  }

  const player = new ReplyPlayer();
  window.voiceAgentPlayer = player;
  // Browsers start audio only after a user gesture: the first click or key unlocks it.
  for (const name of ["pointerdown", "keydown"]) {
    document.addEventListener(name, () => player.context(), { capture: true });
  }
  player.connect();
})();
