#!/usr/bin/env bash
# Retake the panel screenshots in this folder: a 3-node local cluster on the tiny test model,
# Chromium (Debian's) driven by puppeteer-core from the Mermaid CLI's install in
# /var/cache/exo-docs (see CONTRIBUTING.md). Run from the repository root.
set -euo pipefail
port=${PORT:-52500}
model=${MODEL:-../shared/models/stories260K/hf}
out=$(cd "$(dirname "$0")" && pwd)
exo --model "$model" --local-nodes 3 --port "$port" &
exo_pid=$!
trap 'kill -TERM $exo_pid 2>/dev/null; wait $exo_pid' EXIT   # a background job ignores SIGINT
for _ in $(seq 100); do
  kill -0 $exo_pid
  curl -sf "http://127.0.0.1:$port/healthz" | grep -q '"ready":true' && break
  sleep 0.3
done
PORT=$port OUT=$out node - <<'JS'
const puppeteer = require("/var/cache/exo-docs/node_modules/puppeteer-core");
(async () => {
  const browser = await puppeteer.launch({executablePath: "/usr/bin/chromium", headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"]});
  const page = await browser.newPage();
  await page.setViewport({width: 1280, height: 900});
  const shots = [["/", "#nodes > *", "panel-cluster.png"], ["/split", "#shares tbody tr", "panel-split.png"]];
  for (const [path, ready, file] of shots) {
    await page.goto(`http://127.0.0.1:${process.env.PORT}${path}`, {waitUntil: "domcontentloaded"});
    await page.waitForSelector(ready, {timeout: 20000});
    await new Promise(r => setTimeout(r, 2500));   // a heartbeat or two, so the live figures are in
    await page.screenshot({path: `${process.env.OUT}/${file}`});
  }
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
JS
