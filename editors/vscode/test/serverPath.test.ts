import assert from 'node:assert/strict';
import { test } from 'node:test';
import { PathContext, resolveServerPath, searchedPaths } from '../src/serverPath';

function context(files: string[], overrides: Partial<PathContext> = {}): PathContext {
  return {
    setting: '',
    workspaceFolders: ['/home/ada/codelm/src'],
    extensionPath: '/home/ada/.vscode/extensions/codelm.codelm-0.1.0',
    envPath: '/usr/local/bin:/usr/bin',
    home: '/home/ada',
    platform: 'linux',
    isFile: (file) => files.includes(file),
    ...overrides,
  };
}

test('the serverPath setting wins, even when the file is missing', () => {
  const files = ['/home/ada/codelm/.venv/bin/codelm-lsp'];
  assert.equal(resolveServerPath(context(files, { setting: '/opt/lsp' })), '/opt/lsp');
});

test('a relative setting is relative to the first workspace folder; ~ is the home folder', () => {
  assert.equal(resolveServerPath(context([], { setting: 'bin/lsp' })), '/home/ada/codelm/src/bin/lsp');
  assert.equal(resolveServerPath(context([], { setting: '~/bin/lsp' })), '/home/ada/bin/lsp');
});

test('the venv of the workspace or of a parent folder comes before PATH', () => {
  const files = ['/home/ada/codelm/.venv/bin/codelm-lsp', '/usr/bin/codelm-lsp'];
  assert.equal(resolveServerPath(context(files)), '/home/ada/codelm/.venv/bin/codelm-lsp');
});

test('the venv above the extension folder is found (an extension run from the repo)', () => {
  const files = ['/work/codelm/.venv/bin/codelm-lsp', '/usr/bin/codelm-lsp'];
  const ctx = context(files, { workspaceFolders: [], extensionPath: '/work/codelm/editors/vscode' });
  assert.equal(resolveServerPath(ctx), '/work/codelm/.venv/bin/codelm-lsp');
});

test('PATH is searched last; nothing found is undefined', () => {
  assert.equal(resolveServerPath(context(['/usr/bin/codelm-lsp'])), '/usr/bin/codelm-lsp');
  assert.equal(resolveServerPath(context([])), undefined);
});

test('a bare command name in the setting is searched like the default', () => {
  const ctx = context(['/usr/bin/codelm-lsp-dev'], { setting: 'codelm-lsp-dev' });
  assert.equal(resolveServerPath(ctx), '/usr/bin/codelm-lsp-dev');
});

test('Windows looks in .venv\\Scripts for codelm-lsp.exe', () => {
  const ctx = context([], {
    platform: 'win32',
    workspaceFolders: ['C:\\src\\codelm'],
    extensionPath: 'C:\\ext',
    envPath: 'C:\\bin',
  });
  const paths = searchedPaths('codelm-lsp.exe', ctx);
  assert.equal(paths[0], 'C:\\src\\codelm\\.venv\\Scripts\\codelm-lsp.exe');
  assert.equal(paths.at(-1), 'C:\\bin\\codelm-lsp.exe');
});
