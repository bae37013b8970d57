// Node 20 lacks Promise.withResolvers (added in Node 22 / V8 12.2), which the
// pinned js-libp2p packages call at runtime. Import this module before any
// libp2p module. It is a no-op on runtimes that already provide it.
if (typeof Promise.withResolvers !== 'function') {
  Object.defineProperty(Promise, 'withResolvers', {
    configurable: true,
    writable: true,
    value: function withResolvers () {
      let resolve
      let reject
      const promise = new this((res, rej) => {
        resolve = res
        reject = rej
      })
      return { promise, resolve, reject }
    }
  })
}
