// The official e2b JS SDK against `wrenn up` (started by tests/platform, which runs this file
// with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set, or E2B_DOMAIN with
// NODE_EXTRA_CA_CERTS for the HTTPS front).
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'

import { Sandbox } from 'e2b'

let sandbox

before(async () => {
  sandbox = await Sandbox.create({ timeoutMs: 180_000 })
})

after(async () => {
  await sandbox?.kill()
})

test('commands run as `user` in /home/user by default', async () => {
  const result = await sandbox.commands.run('whoami; pwd; echo $HOME')
  assert.equal(result.stdout, 'user\n/home/user\n/home/user\n')
})

test('relative paths resolve under /home/user and files belong to `user`', async () => {
  await sandbox.files.write('relative-note.txt', 'from the JS SDK')
  const info = await sandbox.files.getInfo('/home/user/relative-note.txt')
  assert.equal(info.owner, 'user')
  assert.equal(await sandbox.files.read('relative-note.txt'), 'from the JS SDK')
})

test('a multi-file write creates the parent directories it needs, owned by the user', async () => {
  const entries = [
    { path: '/0/multi_test_file0.txt', data: 'zero' },
    { path: '/0/deeper/multi_test_file1.txt', data: 'one' },
    { path: 'nested/dirs/multi_test_file2.txt', data: 'two' },
    { path: '/tmp/js-sdk/a/b/multi_test_file3.txt', data: 'three' },
  ]
  const written = await sandbox.files.write(entries)
  assert.equal(written.length, entries.length)
  for (const entry of entries) {
    assert.equal(await sandbox.files.read(entry.path), entry.data, entry.path)
  }
  for (const dir of ['/0', '/0/deeper', '/home/user/nested', '/home/user/nested/dirs', '/tmp/js-sdk', '/tmp/js-sdk/a/b']) {
    const info = await sandbox.files.getInfo(dir)
    assert.equal(info.type, 'dir', dir)
    assert.equal(info.owner, 'user', dir)
    assert.equal(info.group, 'user', dir)
    assert.equal(info.permissions, 'drwxr-xr-x', dir)
  }
  // A directory that existed keeps its owner: / is still root's.
  assert.equal((await sandbox.files.getInfo('/')).owner, 'root')
})

test('a write where a parent is a file fails and changes nothing', async () => {
  await sandbox.files.write('/home/user/plain-file', 'not a directory')
  await assert.rejects(sandbox.files.write('/home/user/plain-file/child.txt', 'x'))
  assert.equal(await sandbox.files.read('/home/user/plain-file'), 'not a directory')
})
