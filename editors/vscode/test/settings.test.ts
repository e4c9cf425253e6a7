import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigReader, isLanguageEnabled, serverOptions, toggleLanguage } from '../src/settings';

function reader(values: Record<string, unknown>): ConfigReader {
  return { get: <T>(key: string) => values[key] as T | undefined };
}

test('serverOptions maps every setting to the server option of the same meaning', () => {
  const options = serverOptions(
    reader({
      enable: false,
      model: 'qwen2.5-coder-0.5b',
      maxTokens: 16,
      maxTimeMs: 1500,
      singleLine: 'always',
      debounceMs: 10,
      timeoutMs: 90000,
      enabledLanguages: ['python'],
      disabledLanguages: ['markdown'],
      contextFiles: 0,
      warmup: false,
      'daemon.url': 'http://127.0.0.1:8765',
      'daemon.autoStart': false,
      serverPath: '/opt/codelm-lsp',
    }),
  );
  assert.deepEqual(options, {
    enabled: false,
    model: 'qwen2.5-coder-0.5b',
    maxTokens: 16,
    maxTimeMs: 1500,
    singleLine: 'always',
    debounceMs: 10,
    timeoutMs: 90000,
    enabledLanguages: ['python'],
    disabledLanguages: ['markdown'],
    contextFiles: 0,
    warmup: false,
    warmupFromHighlights: false,
    daemon: { url: 'http://127.0.0.1:8765', autoStart: false },
  });
});

test('serverOptions uses the server defaults and sends empty strings as null', () => {
  assert.deepEqual(serverOptions(reader({ model: '  ', 'daemon.url': '' })), {
    enabled: true,
    model: null,
    maxTokens: 64,
    maxTimeMs: 0,
    singleLine: 'auto',
    debounceMs: 75,
    timeoutMs: 10000,
    enabledLanguages: [],
    disabledLanguages: [],
    contextFiles: 3,
    warmup: true,
    warmupFromHighlights: false,
    daemon: { url: null, autoStart: true },
  });
});

test('isLanguageEnabled follows the server rule: disabled wins, empty enabled list means all', () => {
  assert.equal(isLanguageEnabled({ enabledLanguages: [], disabledLanguages: [] }, 'python'), true);
  assert.equal(isLanguageEnabled({ enabledLanguages: ['go'], disabledLanguages: [] }, 'python'), false);
  assert.equal(isLanguageEnabled({ enabledLanguages: ['Python'], disabledLanguages: ['python'] }, 'python'), false);
});

test('toggleLanguage disables an enabled language and enables it back', () => {
  const off = toggleLanguage({ enabledLanguages: [], disabledLanguages: ['go'] }, 'Python');
  assert.deepEqual(off, { enabledLanguages: [], disabledLanguages: ['go', 'python'] });
  assert.deepEqual(toggleLanguage(off, 'python'), { enabledLanguages: [], disabledLanguages: ['go'] });
});

test('toggleLanguage adds the language to a non-empty enabled list', () => {
  const lists = toggleLanguage({ enabledLanguages: ['go'], disabledLanguages: [] }, 'rust');
  assert.deepEqual(lists, { enabledLanguages: ['go', 'rust'], disabledLanguages: [] });
});
