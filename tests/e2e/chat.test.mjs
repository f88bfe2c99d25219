// The chat page in headless Chromium against live `tiefsee serve` processes started by run.sh:
// TIEFSEE_URL serves deepseek-v3 (answers are content), TIEFSEE_R1_URL the same weights under the R1
// template (answers are all reasoning) behind the API key TIEFSEE_R1_KEY. The fixture's weights are random, so only the shape of what
// streams is checked, never its text.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const URL_V3 = process.env.TIEFSEE_URL;
const URL_R1 = process.env.TIEFSEE_R1_URL;
const KEY_R1 = process.env.TIEFSEE_R1_KEY;
const OUT = join(dirname(fileURLToPath(import.meta.url)), "out");
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

let profile;
let context;

before(async () => {
  assert.ok(URL_V3 && URL_R1, "run through tests/e2e/run.sh, which sets TIEFSEE_URL and TIEFSEE_R1_URL");
  mkdirSync(OUT, { recursive: true });
  profile = mkdtempSync(join(tmpdir(), "tiefsee-e2e-"));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: ARGS,
    viewport: { width: 1200, height: 800 },
  });
  context.setDefaultTimeout(15_000);
});

after(async () => {
  await context?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

// Opens the page with settings fixed through the UI: greedy decoding keeps runs repeatable.
async function openPage(url, { maxTokens }) {
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(url);
  await setSettings(page, { temperature: 0, maxTokens });
  return { page, errors };
}

async function setSettings(page, { temperature, maxTokens, apiKey }) {
  await page.click("#settings summary");
  // A range input cannot be typed into; set it as a drag would, with an input event.
  if (temperature !== undefined) {
    await page.locator("#temperature").evaluate((input, value) => {
      input.value = value;
      input.dispatchEvent(new Event("input", { bubbles: true }));
    }, String(temperature));
  }
  if (maxTokens !== undefined) await page.fill("#max-tokens", String(maxTokens));
  if (apiKey !== undefined) await page.fill("#api-key", apiKey);
  await page.click("#settings summary");
}

async function ask(page, text) {
  await page.click("#prompt");
  await page.keyboard.type(text);
  await page.keyboard.press("Enter");
}

// A counter or gauge from the server's Prometheus text.
async function metric(url, name) {
  const text = await (await fetch(`${url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  assert.ok(line, `${name} in /metrics`);
  return Number(line.split(" ")[1]);
}

const idle = (page) => page.waitForSelector('body[data-state="idle"]');
const lastAssistant = (page) => page.locator(".msg.assistant").last();

describe("chat page", () => {
  it("loads", async () => {
    const { page, errors } = await openPage(URL_V3, { maxTokens: 16 });
    assert.equal(await page.title(), "tiefsee chat");
    assert.ok(await page.isVisible("#prompt"));
    assert.ok(await page.isVisible("#send"));
    assert.ok(await page.isHidden("#stop"));
    assert.deepEqual(errors, []);
    await page.close();
  });

  it("streams an answer on Enter, keeps Shift+Enter as a newline, and keeps it across a reload", async () => {
    const { page, errors } = await openPage(URL_V3, { maxTokens: 24 });
    await page.click("#prompt");
    await page.keyboard.type("first line");
    await page.keyboard.press("Shift+Enter");
    await page.keyboard.type("second line");
    assert.equal(await page.inputValue("#prompt"), "first line\nsecond line");
    await page.keyboard.press("Enter");
    await page.waitForSelector(".msg.user");
    await page.waitForFunction(() => document.querySelector(".msg.assistant .content")?.textContent.length > 0);
    await idle(page);
    assert.equal(await page.inputValue("#prompt"), "");
    assert.equal(await page.locator(".msg.user").textContent(), "first line\nsecond line");
    const answer = await lastAssistant(page).locator(".content").textContent();
    assert.ok(answer.length > 0);
    assert.equal(await page.locator("#conversations li").count(), 1);
    assert.equal(await page.locator("#conversations .open").textContent(), "first line");

    await page.reload();
    await page.waitForSelector(".msg.assistant");
    assert.equal(await page.locator(".msg.user").textContent(), "first line\nsecond line");
    assert.equal(await lastAssistant(page).locator(".content").textContent(), answer);
    assert.equal(await page.locator("#conversations li").count(), 1);
    assert.deepEqual(errors, []);
    await page.close();
  });

  it("stops a long answer and returns to idle", async () => {
    const { page, errors } = await openPage(URL_V3, { maxTokens: 16000 });
    const cancelledBefore = await metric(URL_V3, "tiefsee_requests_cancelled_total");
    await page.click("#new-chat");
    await ask(page, "Write a very long story.");
    await page.waitForFunction(() => document.querySelector(".msg.assistant:last-child .content")?.textContent.length > 0);
    assert.ok(await page.isVisible("#stop"));
    await page.click("#stop");
    await idle(page);
    assert.ok(await page.isVisible("#send"));
    assert.ok(await page.isHidden("#stop"));
    assert.equal(await lastAssistant(page).locator(".note").textContent(), "Stopped.");
    const stopped = await lastAssistant(page).locator(".content").textContent();
    await page.waitForTimeout(500);
    assert.equal(await lastAssistant(page).locator(".content").textContent(), stopped, "nothing arrives after Stop");
    // Closing the stream is what cancels the request on the server.
    assert.equal(await metric(URL_V3, "tiefsee_requests_cancelled_total"), cancelledBefore + 1);
    assert.equal(await metric(URL_V3, "tiefsee_running_sequences"), 0);
    // A new question works after a stop.
    await setSettings(page, { maxTokens: 8 });
    await ask(page, "And a short one?");
    await page.waitForFunction(() => document.querySelectorAll(".msg.assistant").length === 2);
    await idle(page);
    await page.click("#settings summary");
    await page.screenshot({ path: join(OUT, "chat-stopped.png") });
    assert.deepEqual(errors, []);
    await page.close();
  });

  it("shows the server's error, then sends the API key as a Bearer token", async () => {
    const { page, errors } = await openPage(URL_R1, { maxTokens: 8, apiKey: "wrong" });
    await ask(page, "Hello?");
    await idle(page);
    const note = await lastAssistant(page).locator(".note").textContent();
    assert.match(note, /^Error: .*API key/);
    await page.locator("#conversations .delete").click();
    assert.equal(await page.locator("#conversations li").count(), 0);
    assert.equal(await page.locator(".msg").count(), 0);
    await setSettings(page, { apiKey: KEY_R1 });
    await page.reload();
    assert.equal(await page.locator("#api-key").inputValue(), KEY_R1, "settings persist");
    assert.deepEqual(errors, []);
    await page.close();
  });

  it("shows the reasoning in a block that is open while it streams", async () => {
    const { page, errors } = await openPage(URL_R1, { maxTokens: 200 });
    await ask(page, "Think about the sea, then answer.");
    const reasoning = lastAssistant(page).locator("details.reasoning");
    await page.waitForFunction(() => document.querySelector(".msg.assistant:last-child .thought")?.textContent.length > 0);
    assert.ok(await reasoning.isVisible());
    const openWhileStreaming = await reasoning.evaluate((d) => d.open);
    const stateWhileStreaming = await page.evaluate(() => document.body.dataset.state);
    await idle(page);
    if (stateWhileStreaming === "streaming") assert.ok(openWhileStreaming, "the reasoning is open while it streams");
    assert.ok((await reasoning.locator(".thought").textContent()).length > 0);
    // After the answer the block still folds and unfolds.
    await reasoning.locator("summary").click();
    const toggled = await reasoning.evaluate((d) => d.open);
    await reasoning.locator("summary").click();
    assert.notEqual(await reasoning.evaluate((d) => d.open), toggled);
    if (!(await reasoning.evaluate((d) => d.open))) await reasoning.locator("summary").click();
    await page.screenshot({ path: join(OUT, "chat.png") });
    assert.deepEqual(errors, []);
    await page.close();
  });

  it("renders markdown without letting HTML through", async () => {
    const { page } = await openPage(URL_V3, { maxTokens: 8 });
    const html = await page.evaluate(() =>
      renderMarkdown("**b** *i* `<x>` <img src=x onerror=alert(1)>\n- one\n- two\n```js\na < b\n```\n[l](javascript:alert(1)) [ok](https://example.com/a_b_c)"));
    assert.match(html, /<strong>b<\/strong> <em>i<\/em> <code>&lt;x&gt;<\/code> &lt;img/);
    assert.match(html, /<ul><li>one<\/li><li>two<\/li><\/ul>/);
    assert.match(html, /<pre><code class="language-js">a &lt; b<\/code><\/pre>/);
    assert.doesNotMatch(html, /href="javascript/);
    assert.match(html, /<a href="https:\/\/example.com\/a_b_c"/);
    await page.close();
  });
});
