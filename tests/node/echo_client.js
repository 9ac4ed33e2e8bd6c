// A Node `ws` client for the end-to-end tests: connects to the URL in argv[2] (trusting the CA
// file in argv[3] for wss://), sends text and binary messages of several sizes, checks each
// comes back unchanged and in order, closes cleanly, and prints "ok <count>".
'use strict';
const fs = require('fs');
const WebSocket = require('ws');

const [url, caFile] = process.argv.slice(2);
const options = { maxPayload: 64 << 20 };
if (caFile) {
  options.ca = fs.readFileSync(caFile);
}
const sizes = [0, 1, 125, 126, 65535, 65536, 1 << 20];
const expected = [];
for (const size of sizes) {
  expected.push({ binary: false, data: 'é'.repeat(size >> 1) + 'a'.repeat(size & 1) });
  const bytes = Buffer.alloc(size);
  for (let i = 0; i < size; i++) bytes[i] = (i * 7 + size) & 0xff;
  expected.push({ binary: true, data: bytes });
}

const ws = new WebSocket(url, options);
let received = 0;
const timer = setTimeout(() => {
  console.error(`timed out after ${received} of ${expected.length} messages`);
  process.exit(2);
}, 30000);
ws.on('open', () => {
  for (const message of expected) ws.send(message.data, { binary: message.binary });
});
ws.on('message', (data, isBinary) => {
  const want = expected[received];
  const same = want.binary
    ? isBinary && Buffer.compare(data, want.data) === 0
    : !isBinary && data.toString('utf8') === want.data;
  if (!same) {
    console.error(`message ${received} changed (binary ${isBinary}, ${data.length} bytes)`);
    process.exit(1);
  }
  received += 1;
  if (received === expected.length) ws.close(1000, 'done');
});
ws.on('close', (code) => {
  clearTimeout(timer);
  if (received !== expected.length || code !== 1000) {
    console.error(`closed with ${code} after ${received} of ${expected.length} messages`);
    process.exit(1);
  }
  console.log(`ok ${received}`);
});
ws.on('error', (error) => {
  console.error(`error: ${error.message}`);
  process.exit(1);
});
